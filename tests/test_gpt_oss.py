"""[families] gpt-oss beyond the checks every family gets in tests/test_families.py (logits with sinks, the
sliding window and YaRN; KV cache; PEFT all-linear both ways; merged export): expert and router LoRA
(`target_parameters`) through PEFT and a merged export, int8 and NF4 bases training, expert and tensor
meshes, and gpt-oss-20b's own config.json against transformers.

One tiny random checkpoint (tests/helpers/hf_tiny.py: 8 biased experts top-2 whose gate/up pre-activations
pass the clamp, sinks, window 4, YaRN) serves every check; one 4-device subprocess runs the training.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models import config_from_hf, forward, load_model
from jaxlora.models.random_weights import init_params
from jaxlora.models.rope import layer_inv_freq
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import QuantizedTensor, count_params, dequantize, make_quantizer
from tests.helpers.family_checks import merged_export_gap, peft_export_gap
from tests.helpers.hf_tiny import model_cache
from tests.helpers.parallel_runs import _drive
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

PARAMS = ["mlp.router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
STEPS = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, torch model, jaxlora Model) of the tiny gpt-oss, built once."""
    return model_cache(tmp_path_factory)("gpt_oss")


def test_expert_and_router_lora_round_trip_peft_and_merge(built, tmp_path):
    """LoRA on q/v, the router and both expert weights: jaxlora -> PEFT (ragged and dense experts agree),
    PEFT -> jaxlora, and the merged export in transformers, all within 1e-4 of the reference logits."""
    folder, _, model = built
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), target_parameters=PARAMS)
    ids = token_ids(model.config.vocab_size)
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    assert set(lora["moe"]) == {"router", "gate_up_proj", "down_proj"}
    ours = jax_logits(model, ids, lora, lc)
    ragged = dataclasses.replace(model, config=model.config.with_runtime(moe_impl="ragged"))
    assert np.abs(jax_logits(ragged, ids, lora, lc) - ours).max() < 1e-5
    exported, _ = peft_export_gap(model, folder, lora, lc, ids, tmp_path / "adapter")
    torch.manual_seed(0)
    made = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=PARAMS),
    )
    randomize_peft_(made, 2)
    ref = torch_logits(made.eval(), ids)
    made.save_pretrained(tmp_path / "peft")
    back, back_cfg = load_peft_adapter(tmp_path / "peft", model.config)
    imported = np.abs(jax_logits(model, ids, back, back_cfg) - ref).max()
    merged = merged_export_gap(model, lora, lc, ids, tmp_path / "merged")
    print(f"gpt_oss experts+router: to PEFT {exported:.2e}, from PEFT {imported:.2e}, merged {merged:.2e}")
    assert max(exported, imported, merged) < 1e-4


def test_all_linear_is_attention_only_as_in_peft(built):
    """PEFT's all-linear on GptOssForCausalLM: q/k/v/o (the router is a pair of Parameters, not a Linear;
    the experts are 3-D Parameters): jaxlora adapts the same modules."""
    folder, _, model = built
    made = get_peft_model(hf_model(folder), PeftLoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.split(".")[-2] for n, _ in made.named_modules() if n.endswith(".lora_A")}
    tree = init_lora(model.config, LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    assert theirs == set(tree["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} and "moe" not in tree


def test_quantized_bases_and_expert_mesh_train(built, tmp_path):
    """int8, NF4 and MXFP4 bases quantize the experts (router, sinks and biases stay in float) and are
    exactly the model of their dequantized weights; in one 4-device process, LoRA on q/v/o and the experts
    trains STEPS steps on an int8 base on one device (dense experts) and on tensor=2 x expert=2 (ragged
    experts: the same losses), on an NF4 base, and on an MXFP4 base on tensor=2 x expert=2: the losses
    fall."""
    folder, _, model = built
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    for kind in ("int8", "nf4", "mxfp4"):
        q = load_model(folder, quantizer=make_quantizer(kind))
        moe = q.params["layers"]["moe"]
        assert isinstance(moe["gate_up_proj"]["kernel"], QuantizedTensor)
        assert isinstance(moe["down_proj"]["kernel"], QuantizedTensor)
        assert not isinstance(moe["router"]["kernel"], QuantizedTensor)
        deq = jax.tree.map(
            lambda x: jnp.asarray(dequantize(x, np.float32)) if isinstance(x, QuantizedTensor) else x,
            q.params,
            is_leaf=lambda x: isinstance(x, QuantizedTensor),
        )
        assert float(jnp.abs(forward(deq, q.config, ids) - forward(q.params, q.config, ids)).max()) < 1e-4
    f = str(folder)
    int8 = {"moe": f, "steps": STEPS, "quant": "int8"}
    runs = [
        {"name": "int8", **int8},
        {"name": "t2e2", **int8, "mesh": {"tensor": 2, "expert": 2}, "impl": "ragged"},
        {"name": "nf4", "moe": f, "steps": STEPS, "quant": "nf4"},
        {"name": "mxfp4", "moe": f, "steps": STEPS, "quant": "mxfp4", "mesh": {"tensor": 2, "expert": 2}},
    ]
    got = _drive(runs, 4, tmp_path / "runs.json")
    one = got["int8"]["losses"]
    diff = max(abs(one[s] - got["t2e2"]["losses"][s]) for s in range(1, STEPS + 1))
    print(f"gpt_oss tensor=2 x expert=2 (ragged) vs one device (dense): max loss diff {diff:.2e}")
    assert diff < 1e-4
    for name in ("int8", "nf4", "mxfp4"):
        losses = got[name]["losses"]
        print(f"gpt_oss {name}: losses", [round(losses[s], 3) for s in range(1, STEPS + 1)])
        assert losses[STEPS] < 0.9 * losses[1]


# gpt-oss-20b's config.json (openai/gpt-oss-20b, the transformers 4 layout), without its MXFP4
# quantization_config
GPT_OSS_20B = dict(
    model_type="gpt_oss",
    architectures=["GptOssForCausalLM"],
    attention_bias=True,
    attention_dropout=0.0,
    eos_token_id=200002,
    experts_per_token=4,
    head_dim=64,
    hidden_act="silu",
    hidden_size=2880,
    initial_context_length=4096,
    intermediate_size=2880,
    layer_types=["sliding_attention", "full_attention"] * 12,
    max_position_embeddings=131072,
    num_attention_heads=64,
    num_experts_per_tok=4,
    num_hidden_layers=24,
    num_key_value_heads=8,
    num_local_experts=32,
    pad_token_id=199999,
    rms_norm_eps=1e-05,
    rope_scaling={
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    rope_theta=150000,
    router_aux_loss_coef=0.9,
    sliding_window=128,
    swiglu_limit=7.0,
    tie_word_embeddings=False,
    vocab_size=201088,
)


def test_gpt_oss_20b_config_reads_as_transformers():
    """The real config: windows, YaRN (`truncate` off) frequencies and cos/sin factor as transformers
    computes them, experts, and the parameter count of transformers' model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config_from_hf(GPT_OSS_20B)
    assert cfg.sliding_windows == (128, 0) * 12 and cfg.attn_sinks and cfg.qkv_bias and cfg.o_bias
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (32, 4, 2880)
    assert (cfg.swiglu_alpha, cfg.swiglu_limit, cfg.rope_truncate) == (1.702, 7.0, False)
    hf = AutoConfig.for_model(**GPT_OSS_20B)
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    np.testing.assert_allclose(
        np.asarray(layer_inv_freq(cfg, jnp.zeros((1, 1), jnp.int32))[0]), inv, rtol=1e-6
    )
    assert cfg.rope_attention_factor == pytest.approx(factor)
    ours = count_params(jax.eval_shape(lambda: init_params(cfg)))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())
    print(f"gpt-oss-20b: {ours:,} parameters (transformers: {theirs:,})")
    assert ours == theirs
