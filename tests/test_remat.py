"""[memory] The remat policies (`jaxlora.models.remat`): the same loss and gradients under every policy, what
each keeps (XLA's temp bytes of a compiled gradient), the MLP run in tiles over long rows, the residual
stream kept in the compute dtype between layers, and `offload` off a GPU (refused by a run, estimated by
the plan), and a hybrid model's period of layers recomputed one layer at a time."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora.models.decoder as decoder
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models.config import config_from_hf
from jaxlora.models.random_weights import init_params
from jaxlora.models.remat import REMAT
from jaxlora.train.memory_plan import plan_memory
from jaxlora.train.step import StepSpec, loss_and_count
from tests.helpers.hf_tiny import hf_config

LLAMA = dict(
    model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip
POLICIES = ("none", "fast", "lean", "full")  # dots: tests/test_benchmark.py's FLOPs; minimal is full


def _setup(t: int, batch: int = 2, **runtime):
    cfg = config_from_hf(LLAMA).with_runtime(packed=True, **runtime)
    lora_cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (batch, t)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * (t // 2) + [2] * (t - t // 2 - 3) + [0] * 3], batch, 0), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]), jnp.int32)
    batch_ = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "segment_ids": seg,
              "positions": jnp.broadcast_to(pos * (seg[0] > 0), (batch, t))}  # fmt: skip
    return cfg, init_params(cfg, 0), lora, jnp.asarray(lora_scale(cfg, lora_cfg)), batch_


def _grad(cfg, params, lora, scale, batch):
    """The compiled float32 value and gradient of the SFT loss with respect to the adapter."""
    spec = StepSpec(cfg, 0.0, 64)
    fn = jax.jit(jax.value_and_grad(lambda lo: loss_and_count(lo, params, batch, scale, None, spec)[0]))
    return fn.lower(lora).compile()


def _temp(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def every_policy():
    """(loss, grads, temp bytes) of one float32 gradient per policy, T = 96."""
    out = {}
    for remat in POLICIES:
        cfg, params, lora, scale, batch = _setup(96, remat=remat)
        fn = _grad(cfg, params, lora, scale, batch)
        out[remat] = (*fn(lora), _temp(fn))
    return out


def test_every_policy_gives_the_same_loss_and_gradients(every_policy):
    loss0, g0, _ = every_policy["none"]
    for remat, (loss, g, _) in every_policy.items():
        assert abs(float(loss) - float(loss0)) <= 1e-6 * abs(float(loss0)), remat
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7, err_msg=remat)


def test_leaner_policies_keep_less(every_policy):
    temp = {remat: t for remat, (_, _, t) in every_policy.items()}
    assert REMAT["minimal"] is REMAT["full"]  # one policy, two names
    assert temp["full"] < temp["lean"] < temp["fast"] < temp["none"], temp


def test_mlp_tiles_equal_the_whole_mlp(monkeypatch):
    """Rows longer than MLP_TILE run the MLP in rematerialized tiles (the last one padded): the same loss
    and gradients as the untiled MLP, and less temp memory."""
    cfg, params, lora, scale, batch = _setup(90, remat="lean")
    whole = _grad(cfg, params, lora, scale, batch)
    loss0, g0 = whole(lora)
    monkeypatch.setattr(decoder, "MLP_TILE", 16)  # 6 tiles of 15 positions
    tiled = _grad(cfg, params, lora, scale, batch)
    loss, g = tiled(lora)
    assert abs(float(loss) - float(loss0)) <= 1e-6 * abs(float(loss0))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    text = tiled.as_text()
    assert "[2,15,256]" in text and "[2,90,256]" not in text  # [B, tile, F] intermediates only
    assert _temp(tiled) < _temp(whole)


def test_residual_stream_is_kept_in_the_compute_dtype_between_layers():
    """bfloat16 compute: the scan over layers carries [B, T, D] bfloat16 (as transformers' hidden states),
    so a policy that keeps the layer input keeps 2 bytes per value."""
    cfg, params, lora, scale, batch = _setup(32, compute_dtype="bfloat16", remat="full")
    jaxpr = jax.make_jaxpr(lambda lo: decoder.forward(params, cfg, batch["input_ids"], lora=lo))(lora)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    carry = scans[0].outvars[0].aval
    assert (carry.shape, carry.dtype) == ((2, 32, 64), jnp.bfloat16)


def test_offload_needs_a_gpu_and_the_plan_estimates_it(tmp_path):
    """A run refuses train.remat=offload on the CPU in one line; the plan plans `minimal` less the layer
    inputs offload would move to the host, and says so."""
    with pytest.raises(UserError, match="train.remat=offload .* needs a GPU"):
        config_from_hf(LLAMA).with_runtime(remat="offload")
    folder = tmp_path / "model"
    folder.mkdir()
    hf_config("llama").save_pretrained(folder)
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(folder)},
        "data": {"train": [{"path": str(folder / "none.jsonl"), "format": "alpaca"}], "seq_len": 64},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"batch_size": 2, "remat": "minimal"},
        "parallel": {"strategy": "single"},
    }
    minimal = plan_memory(config_from_dict(raw))
    raw["train"]["remat"] = "offload"
    offload = plan_memory(config_from_dict(raw))
    cfg = hf_config("llama")
    moved = cfg.num_hidden_layers * 2 * 64 * cfg.hidden_size * 4  # [L, B, T, D] float32
    assert offload["memory"]["activations"] == minimal["memory"]["activations"] - moved
    assert any("offload needs a GPU" in n for n in offload["notes"]), offload["notes"]


def test_a_hybrid_period_recomputes_one_layer_at_a_time(monkeypatch):
    """Qwen3.5's scan step runs a period of 4 layers (3 DeltaNet, 1 attention). `remat.after_cotangent`
    keeps XLA from recomputing all 4 before the first backward: the same loss and gradients, and about
    half the temp bytes of the same program without it (49 against 103 MiB at T = 512)."""
    preset = Path(__file__).resolve().parents[1] / "benchmarks" / "presets" / "qwen3.5-0.8b" / "config.json"
    raw = json.loads(preset.read_text()) | dict(
        num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], vocab_size=512,
        hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=4,
    )  # fmt: skip
    cfg = config_from_hf(raw).with_runtime(remat="full")
    lora_cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 512, (1, 512)), jnp.int32)
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "segment_ids": jnp.ones_like(ids),
             "positions": jnp.arange(512)[None]}  # fmt: skip
    params, scale = init_params(cfg, 0), jnp.asarray(lora_scale(cfg, lora_cfg))
    ordered = _grad(cfg, params, lora, scale, batch)
    monkeypatch.setattr(decoder, "after_cotangent", lambda layer: layer)
    free = _grad(cfg, params, lora, scale, batch)
    (loss, grads), (loss_free, grads_free) = ordered(lora), free(lora)
    np.testing.assert_allclose(loss, loss_free, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_free), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())  # float32 summation order
    print(f"temp: {_temp(ordered) / 2**20:.1f} MiB ordered, {_temp(free) / 2**20:.1f} MiB without")
    assert _temp(ordered) < 0.6 * _temp(free)
