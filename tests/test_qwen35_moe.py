"""[frontier] Qwen3.5-MoE (`qwen3_5_moe_text`): Qwen3.5's hybrid layers (Gated DeltaNet and gated attention)
with a mixture of experts and a gated shared expert in every layer, against transformers and PEFT.

One tiny random `Qwen3_5MoeForCausalLM` (tests/helpers/hf_tiny.py: 4 layers, DeltaNet then gated attention,
twice; 4 experts top-2 and a shared expert) is built once per module and serves every check: padded-batch
logits and the load-balancing loss (scanned over the period and unrolled; dense and ragged experts),
PEFT's all-linear selection, expert and router LoRA (`target_parameters`) to PEFT and back, the merged
export, greedy generation with the hybrid cache, int8/NF4 bases, and training on one device and on
tensor=2 x expert=2. The multimodal `qwen3_5_moe` tower is checked in tests/test_multimodal.py; the real
Qwen3.5-35B-A3B config here.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from jaxlora.config import config_from_dict
from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models import config_from_hf, forward, load_model
from jaxlora.models.random_weights import init_params
from jaxlora.models.targets import linear_modules
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import QuantizedTensor, count_params, dequantize, make_quantizer
from jaxlora.train.memory_plan import plan_memory
from tests.helpers.family_checks import merged_export_gap, peft_export_gap
from tests.helpers.hf_tiny import hf_forward, model_cache, padded_batch
from tests.helpers.parallel_runs import _drive
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

FAMILY = "qwen3_5_moe_text"
PARAMS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PRESET = Path(__file__).resolve().parents[1] / "benchmarks" / "presets" / "qwen3.5-35b-a3b" / "config.json"
STEPS = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, torch model, jaxlora Model) of the tiny Qwen3.5-MoE, built once."""
    return model_cache(tmp_path_factory)(FAMILY)


@pytest.mark.parametrize("scan, impl", [(True, "dense"), (False, "ragged")])
def test_logits_and_aux_loss_match_transformers(scan, impl, built):
    _, hf, model = built
    cfg = model.config.with_runtime(scan_layers=scan, moe_impl=impl)
    assert cfg.mixers == ("linear_attention", "full_attention") * 2 and cfg.norm_topk_prob
    assert model.params["layers"]["moe"]["gate_up_proj"]["kernel"].shape == (4, 4, 32, 48)  # [L, E, D, 2F]
    assert model.params["layers"]["shared_expert"]["router"]["kernel"].shape == (4, 32, 1)
    ids, mask, pos = padded_batch(cfg.vocab_size)
    ours, aux = forward(
        model.params, cfg, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask), return_aux_loss=True
    )
    ref = hf_forward(hf, ids, mask, pos, output_router_logits=True)
    worst = float(np.abs(np.asarray(ours) - ref.logits.numpy())[mask == 1].max())
    aux_diff = abs(float(aux) - float(ref.aux_loss))
    print(
        f"qwen3.5-moe scan={scan} {impl}: max logits diff {worst:.2e}, aux {float(aux):.6f} ({aux_diff:.1e})"
    )
    assert worst < 1e-4 and aux_diff < 1e-5 and float(aux) > 0


def test_greedy_generation_equals_transformers(built):
    """The hybrid cache (tests/test_qwen35_generate.py) with experts: greedy tokens on left-padded prompts
    of lengths 6 and 2 equal transformers' `generate`."""
    from jaxlora.models.generate import generate, left_pad
    from tests.helpers.hf_generate import hf_greedy

    _, hf, model = built
    prompts, new = [[1, 5, 9, 33, 40, 7], [1, 60]], 8
    ids, mask = left_pad(prompts, 0)
    ref = hf_greedy(hf, ids, mask, new)
    ours = np.asarray(generate(model.params, model.config, prompts, new, eos_ids=()))
    assert np.array_equal(ours, ref), (ours, ref)


def test_all_linear_is_what_peft_selects(built):
    """PEFT's all-linear: every nn.Linear of the layers (the DeltaNet's, the attention's, the shared expert's
    and its gate), not the router (a custom module holding a Parameter) nor the experts (3-D Parameters)."""
    folder, _, model = built
    made = get_peft_model(hf_model(folder), PeftLoraConfig(r=2, target_modules="all-linear"))
    assert not made.peft_config["default"].target_parameters
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in made.named_modules()
        if n.endswith(".lora_A")
    }
    tree = init_lora(model.config, LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    ours = {m.hf_prefix.format(i=i) for m in linear_modules(model.config) for i in m.layers}
    assert "moe" not in tree and ours == theirs, sorted(ours ^ theirs)
    assert "model.layers.0.mlp.shared_expert_gate" in ours and "model.layers.1.self_attn.q_proj" in ours


def test_expert_and_router_lora_round_trip_peft_and_merge(built, tmp_path):
    """all-linear plus the router and both expert weights as `target_parameters`: jaxlora -> PEFT (dense
    and ragged experts agree), PEFT -> jaxlora, and the merged export in transformers."""
    folder, _, model = built
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", target_parameters=PARAMS)
    ids = token_ids(model.config.vocab_size)
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    assert set(lora["moe"]) == {"router", "gate_up_proj", "down_proj"}
    ragged = dataclasses.replace(model, config=model.config.with_runtime(moe_impl="ragged"))
    assert np.abs(jax_logits(ragged, ids, lora, lc) - jax_logits(model, ids, lora, lc)).max() < 1e-5
    exported, _ = peft_export_gap(model, folder, lora, lc, ids, tmp_path / "adapter")
    torch.manual_seed(0)
    made = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=PARAMS),
    )
    randomize_peft_(made, 2)
    ref = torch_logits(made.eval(), ids)
    made.save_pretrained(tmp_path / "peft")
    back, back_cfg = load_peft_adapter(tmp_path / "peft", model.config)
    imported = np.abs(jax_logits(model, ids, back, back_cfg) - ref).max()
    merged = merged_export_gap(model, lora, lc, ids, tmp_path / "merged")
    print(
        f"qwen3.5-moe experts+router: to PEFT {exported:.2e}, from PEFT {imported:.2e}, merged {merged:.2e}"
    )
    assert max(exported, imported, merged) < 1e-4


def test_plan_counts_equal_transformers_and_peft(built, tmp_path):
    """`jaxlora plan`'s parameter counts with all-linear plus the experts: transformers' total, PEFT's
    trainable."""
    folder, hf, _ = built
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(folder)},
        "data": {"train": [{"path": str(tmp_path / "none.jsonl"), "format": "alpaca"}], "seq_len": 16},
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "target_parameters": PARAMS,
        },
        "train": {"batch_size": 2},
        "quant": {"weights": "nf4"},
    }
    counts = plan_memory(config_from_dict(raw), compile_step_too=False)["params"]
    lc = PeftLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", target_parameters=PARAMS)
    assert counts["total"] == hf.num_parameters()
    assert counts["trainable"] == get_peft_model(hf_model(folder), lc).get_nb_trainable_parameters()[0]


def test_quantized_bases_and_expert_mesh_train(built, tmp_path):
    """int8 and NF4 quantize the experts and the shared expert (the routers stay in float); NF4 is exactly
    the model of its dequantized weights; in one 4-device process, LoRA on q/v/o and the experts (with
    the load-balancing loss) trains STEPS steps on an int8 base on one device (dense experts) and on
    tensor=2 x expert=2 (ragged experts: the same losses), and on an NF4 base: the losses fall."""
    folder, _, model = built
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    for kind in ("int8", "nf4"):  # q: the NF4 base after the loop
        q = load_model(folder, quantizer=make_quantizer(kind))
        layers = q.params["layers"]
        assert isinstance(layers["moe"]["gate_up_proj"]["kernel"], QuantizedTensor)
        assert isinstance(layers["shared_expert"]["down_proj"]["kernel"], QuantizedTensor)
        assert not isinstance(layers["moe"]["router"]["kernel"], QuantizedTensor)
        assert not isinstance(layers["shared_expert"]["router"]["kernel"], QuantizedTensor)
    deq = jax.tree.map(  # NF4 (the coarser one) is exactly the model of its dequantized weights
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
    ]
    got = _drive(runs, 4, tmp_path / "runs.json")
    one = got["int8"]["losses"]
    diff = max(abs(one[s] - got["t2e2"]["losses"][s]) for s in range(1, STEPS + 1))
    print(f"qwen3.5-moe tensor=2 x expert=2 (ragged) vs one device (dense): max loss diff {diff:.2e}")
    assert diff < 1e-4
    for name in ("int8", "nf4"):
        losses = got[name]["losses"]
        print(f"qwen3.5-moe {name}: losses", [round(losses[s], 3) for s in range(1, STEPS + 1)])
        assert losses[STEPS] < 0.9 * losses[1]


def test_qwen3_5_35b_a3b_config_reads_as_transformers():
    """The benchmark preset (Qwen3.5-35B-A3B's text_config, benchmarks/presets/qwen3.5-35b-a3b) and the same
    config as the multimodal checkpoint writes it read alike, and hold transformers' parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = json.loads(PRESET.read_text())
    cfg = config_from_hf(hf)
    tower = config_from_hf({"model_type": "qwen3_5_moe", "text_config": hf, "tie_word_embeddings": False})
    assert tower == dataclasses.replace(cfg, text_tower_of="qwen3_5_moe")
    assert cfg.mixers == ("linear_attention",) * 3 + ("full_attention",) + cfg.mixers[4:]
    assert cfg.mixers.count("full_attention") == 10 and cfg.rotary_dim == 64
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (256, 8, 512)
    assert cfg.shared_expert_intermediate_size == 512 and cfg.norm_topk_prob
    ours = count_params(jax.eval_shape(lambda: init_params(cfg)))
    with torch.device("meta"):
        theirs = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).parameters()
        )
    print(f"qwen3.5-35b-a3b: {ours:,} parameters (transformers: {theirs:,})")
    assert ours == theirs
