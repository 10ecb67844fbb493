"""[families] Gemma 1/2/3, Phi-3, OLMo 2, Olmo 3, SmolLM3, gpt-oss against transformers and PEFT, trained,
sharded.

One tiny random checkpoint per family (tests/helpers/hf_tiny.py, saved with `save_pretrained`, stories260K's
tokenizer beside it) is built once per module and serves every check: padded-batch logits, KV cache,
PEFT export and import, merged export; one 4-device subprocess (tests/helpers/parallel_driver.py) trains every
family 20 steps on one device and on an fsdp=2 x tensor=2 mesh.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models import config_from_hf, forward, load_model
from jaxlora.models.attention import choose_attention
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import QuantizedTensor, dequantize, make_quantizer
from tests.helpers.family_checks import kv_cache_gap, merged_export_gap, peft_export_gap
from tests.helpers.hf_tiny import NEW_FAMILIES, hf_forward, model_cache, padded_batch
from tests.helpers.parallel_runs import _config, _drive
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

STEPS = 20
MESH_STEPS = 5  # the mesh run repeats the first steps (a constant learning rate after warm-up)
LORA = LoraConfig(r=8, alpha=16, dropout=0.0, use_rslora=True, target_modules="all-linear")
# gpt-oss trains in tests/test_gpt_oss.py instead (with its experts adapted, on expert and tensor meshes)
TRAINED = tuple(f for f in NEW_FAMILIES if f != "gpt_oss")


def _peft_config() -> PeftLoraConfig:
    return PeftLoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM"
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories_dir):
    """family -> (folder with stories260K's tokenizer, torch model, jaxlora Model), each built once."""
    return model_cache(tmp_path_factory, tokenizer_from=stories_dir)


def _hf_logits(hf, ids, mask, pos) -> np.ndarray:
    return hf_forward(hf, ids, mask, pos).logits.numpy()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_logits_match_transformers_on_a_padded_batch(family, built):
    _, hf, model = built(family)
    # 12 tokens (beyond every sliding window of 4); Phi-3 also 40 (beyond longrope's original 32)
    worst = 0.0
    for seq in (12, 40) if family == "phi3" else (12,):
        ids, mask, pos = padded_batch(model.config.vocab_size, seq)
        ours = np.asarray(
            forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
        )
        worst = max(worst, float(np.abs(ours - _hf_logits(hf, ids, mask, pos))[mask == 1].max()))
    print(f"{family}: max |jaxlora - transformers| logits = {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_kv_cache_generation_equals_recompute(family, built):
    _, _, model = built(family)
    worst = kv_cache_gap(model, [[1, 5, 9, 33, 40, 7, 11], [1, 60], [1, 22, 17, 4]], 10)
    print(f"{family}: KV cache vs recompute, max logits diff {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_exported_adapter_loads_in_peft(family, built, tmp_path):
    folder, _, model = built(family)
    lora = randomized(init_lora(model.config, LORA, jax.random.key(0)), 1)
    ids = token_ids(model.config.vocab_size)
    diff, _ = peft_export_gap(model, folder, lora, LORA, ids, tmp_path / "adapter")
    print(f"{family}: jaxlora adapter in PEFT, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_peft_made_adapter_imports(family, built, tmp_path):
    folder, _, model = built(family)
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(folder), _peft_config())
    randomize_peft_(pm, 2)
    ref = torch_logits(pm.eval(), token_ids(model.config.vocab_size))
    pm.save_pretrained(tmp_path / "peft")
    if family == "phi3":  # PEFT targets the fused modules under their own names
        targets = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
        names = {t.split(".")[-1] for t in targets}
        assert {"qkv_proj", "gate_up_proj"} <= names, names
    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    diff = np.abs(jax_logits(model, token_ids(model.config.vocab_size), lora, lc) - ref).max()
    print(f"{family}: PEFT adapter in jaxlora, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_merged_export_loads_in_transformers(family, built, tmp_path):
    _, _, model = built(family)
    lora = randomized(init_lora(model.config, LORA, jax.random.key(0)), 3)
    diff = merged_export_gap(model, lora, LORA, token_ids(model.config.vocab_size), tmp_path / "merged")
    print(f"{family}: merged checkpoint in transformers, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_phi3_loads_through_the_spec(kind, built):
    folder, _, model = built("phi3")
    q = load_model(folder, quantizer=make_quantizer(kind))
    layers = q.params["layers"]
    assert isinstance(layers["attn"]["qkv_proj"]["kernel"], QuantizedTensor)
    assert isinstance(layers["mlp"]["gate_up_proj"]["kernel"], QuantizedTensor)
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    quant = forward(q.params, q.config, ids)
    # Exactly the model of the dequantized weights, and close to the float32 one
    deq = jax.tree.map(
        lambda x: jnp.asarray(dequantize(x, np.float32)) if isinstance(x, QuantizedTensor) else x,
        q.params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    exact = float(jnp.abs(forward(deq, q.config, ids) - quant).max())
    full = forward(model.params, model.config, ids)
    rel = float(jnp.linalg.norm(full - quant) / jnp.linalg.norm(full))
    print(f"phi3 {kind}: vs dequantized weights {exact:.2e}, relative logits error vs float32 {rel:.2e}")
    assert exact < 1e-4 and rel < (0.05 if kind == "int8" else 0.5)  # 4 bits on a 32-wide model


# ----------------------------------------------------------------------------------------------------------
# Training: 20 steps on one device and on fsdp=2 x tensor=2, every family, one 4-device process


@pytest.fixture(scope="module")
def trained(built, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("families_train")
    runs = []
    for family in TRAINED:
        # Gemma's tiny config is MQA (1 KV head); tensor=2 needs 2, so it trains a 2-KV-head variant.
        folder = built(family, **({"num_key_value_heads": 2} if family == "gemma" else {}))[0]
        mesh = {"parallel.strategy": "mesh", "parallel.mesh.fsdp": 2, "parallel.mesh.tensor": 2}
        for name, over in (
            ("single", {"parallel.strategy": "single", "train.max_steps": STEPS}),
            ("f2t2", {**mesh, "train.max_steps": MESH_STEPS}),
        ):
            settings = {
                "data.seq_len": 128,
                "train.batch_size": 4,
                "train.learning_rate": 1e-2,
                "train.lr_schedule": "constant",
                "train.warmup_steps": 2,
                "train.warmup_ratio": None,  # the recipe's ratio would differ between 20 and 5 steps
                # the single run evaluates at 0 and at the end, on the same held-out rows
                "train.eval_every_steps": STEPS if name == "single" else None,
                "train.eval_batches": 2,
                "checkpoint.every_steps": None,
                "lora.dropout": 0.0,
                **over,
            }
            cfg = _config(assets, root / f"{family}-{name}", **settings)
            cfg["model"]["path"] = str(folder)
            runs.append({"name": f"{family} {name}", "config": cfg})
    return _drive(runs, 4, root / "runs.json")


@pytest.mark.parametrize("family", TRAINED)
def test_fine_tune_loss_falls(family, trained):
    losses = trained[f"{family} single"]["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    evals = trained[f"{family} single"]["eval"]  # [[0, loss], [STEPS, loss]] on the same held-out rows
    print(
        f"{family}: eval loss {evals[0][1]:.4f} -> {evals[-1][1]:.4f}; train losses",
        [round(losses[s], 3) for s in range(1, STEPS + 1)],
    )
    assert [e[0] for e in evals] == [0, STEPS]
    assert evals[-1][1] < 0.97 * evals[0][1]
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < np.mean(
        [losses[s] for s in range(1, 6)]
    )


@pytest.mark.parametrize("family", TRAINED)
def test_fsdp2_tensor2_equals_one_device(family, trained):
    a, b = trained[f"{family} single"]["losses"], trained[f"{family} f2t2"]["losses"]
    assert sorted(b) == list(range(1, MESH_STEPS + 1))
    diff = max(abs(a[s] - b[s]) for s in range(1, MESH_STEPS + 1))
    print(f"{family}: fsdp=2 x tensor=2 vs one device, max train-loss diff {diff:.2e}")
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------------------
# config.json layouts and the attention choice


def _gemma3(**kw) -> dict:
    base = dict(
        model_type="gemma3_text",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=8,
    )
    return {**base, **kw}


def test_gemma3_transformers4_and_5_rope_layouts_agree():
    old = config_from_hf(
        _gemma3(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    )
    new = config_from_hf(
        _gemma3(
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    )
    assert old == new
    assert new.layer_rope == ("local",) * 5 + ("global",) and new.sliding_windows == (4,) * 5 + (0,)
    assert (new.rope_theta, new.rope_local_theta, new.rope_factor) == (1e6, 1e4, 8.0)
    with pytest.raises(UserError, match="sliding layers"):
        config_from_hf(
            _gemma3(rope_parameters={"full_attention": {}, "sliding_attention": {"rope_type": "linear"}})
        )


def test_phi3_transformers4_longrope_layout():
    hf = dict(
        model_type="phi3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        original_max_position_embeddings=32,
        partial_rotary_factor=0.5,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]},
    )
    cfg = config_from_hf(hf)
    assert (cfg.rotary_dim, cfg.rope_original_max_positions) == (4, 32)
    assert cfg.rope_attention_factor == pytest.approx((1 + np.log(4) / np.log(32)) ** 0.5)
    with pytest.raises(UserError, match="2 values each"):
        config_from_hf({**hf, "rope_scaling": {**hf["rope_scaling"], "short_factor": [1.0]}})


def _olmo3(**kw) -> dict:  # the transformers 4 layout: rope_theta and a rope_scaling for the full layers
    base = dict(
        model_type="olmo3",
        vocab_size=64,
        pad_token_id=1,
        eos_token_id=2,
        hidden_size=256,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        max_position_embeddings=65536,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    return {**base, **kw}


def test_olmo3_transformers4_layout_scales_the_full_layers_as_transformers():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxlora.models.rope import LayerRope, layer_inv_freq

    old = _olmo3()
    written = AutoConfig.for_model(**old)  # transformers 5 moves rope_scaling to the full layers
    cfg = config_from_hf(old)
    assert cfg == config_from_hf(written.to_dict())
    assert cfg.layer_rope == ("local", "local", "local", "global") * 2
    assert cfg.sliding_windows == (4096, 4096, 4096, 0) * 2
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_local_theta) == ("yarn", 500_000.0, 500_000.0)
    rope = layer_inv_freq(cfg, jnp.arange(4)[None])
    assert isinstance(rope, LayerRope)
    for kind, i in (("full_attention", 3), ("sliding_attention", 0)):
        inv, factor = ROPE_INIT_FUNCTIONS.get(written.rope_parameters[kind]["rope_type"], _default_rope)(
            written, layer_type=kind
        )
        np.testing.assert_allclose(np.asarray(rope.inv_freq[i]), inv.numpy(), rtol=1e-6)
        assert float(rope.factor[i]) == pytest.approx(factor)
    assert float(rope.factor[3]) == pytest.approx(0.1 * np.log(8) + 1)
    with pytest.raises(UserError, match="Olmo 3's sliding layers"):
        config_from_hf(
            _olmo3(rope_parameters={"full_attention": {}, "sliding_attention": {"rope_type": "linear"}})
        )


def _default_rope(config, layer_type):
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    return Olmo3RotaryEmbedding.compute_default_rope_parameters(config, layer_type=layer_type)


def test_unsupported_model_type_lists_the_families():
    with pytest.raises(UserError) as err:
        config_from_hf({"model_type": "bert"})
    msg = str(err.value)
    assert "\n" not in msg and all(f in msg for f in NEW_FAMILIES)


def test_gpu_attention_runs_softcap_and_mixed_windows_in_pallas(built, caplog):
    """cuDNN has no soft-capping and one window for all layers; jaxlora's Pallas kernel has both."""
    cfg2 = built("gemma2")[2].config.with_runtime(compute_dtype="bfloat16")
    cfg3 = built("gemma3_text")[2].config.with_runtime(compute_dtype="bfloat16")
    bf16 = jnp.bfloat16
    with caplog.at_level("WARNING"):
        for packed in (True, False):
            assert choose_attention(cfg2.with_runtime(packed=packed), bf16, 16, backend="gpu") == "pallas"
            assert choose_attention(cfg3.with_runtime(packed=packed), bf16, 16, backend="gpu") == "pallas"
    assert not [r for r in caplog.records if "model.attention=auto" in r.getMessage()]  # no fallback
    # A sequence no longer than the window drops nothing, so unpacked rows may use cuDNN
    assert choose_attention(cfg3.with_runtime(packed=False), bf16, 4, backend="gpu") == "cudnn"
    with pytest.raises(UserError, match="soft-cap") as err:
        choose_attention(cfg2.with_runtime(attention="cudnn", packed=False), bf16, 16, backend="gpu")
    assert "\n" not in str(err.value)
    assert choose_attention(cfg2.with_runtime(attention="pallas"), bf16, 16, backend="gpu") == "pallas"


# ----------------------------------------------------------------------------------------------------------
# gemma3 (Gemma3ForConditionalGeneration): the text tower of a multimodal checkpoint


def test_gemma3_multimodal_checkpoint_loads_its_text_tower(tmp_path):
    from jaxlora.models.safetensors_io import write_safetensors
    from tests.helpers.hf_tiny import make_hf_gemma3

    hf = make_hf_gemma3(tmp_path / "saved")  # written as language_model.model.*, vision_tower.*, ...
    model = load_model(tmp_path / "saved")
    assert model.config.model_type == "gemma3_text" and model.config.text_tower_of == "gemma3"
    ids, mask, pos = padded_batch(model.config.vocab_size, 12)  # beyond the window of 4
    ours = np.asarray(
        forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    )
    diff = float(np.abs(ours - _hf_logits(hf, ids, mask, pos))[mask == 1].max())  # text only, no pixels
    print(f"gemma3 text tower: max |jaxlora - transformers| logits = {diff:.2e}")
    assert diff < 1e-4
    # transformers 5's in-memory names (model.language_model.*, lm_head.*) load the same weights
    mem = tmp_path / "in_memory"
    mem.mkdir()
    shutil.copyfile(tmp_path / "saved" / "config.json", mem / "config.json")
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    write_safetensors(mem / "model.safetensors", state)
    same = load_model(mem)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), same.params, model.params))
    # a tensor of neither tower is still reported
    write_safetensors(
        mem / "model.safetensors", {**state, "language_model.extra.weight": state["lm_head.weight"]}
    )
    with pytest.raises(UserError, match="language_model.extra.weight"):
        load_model(mem)
    # its PEFT and merged exports: tests/test_multimodal.py
