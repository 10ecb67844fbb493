"""[benchmark] the FLOP count, the jaxlora-vs-PEFT harness, and that every speed switch keeps the loss."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
from jaxlora.models.attention import attention_mask, causal_attention, dot_attention
from jaxlora.models.config import ATTENTION_IMPLS, Runtime, config_from_hf
from jaxlora.models.random_weights import init_params
from jaxlora.train.flops import attended_keys, train_step_flops
from jaxlora.train.step import StepSpec, loss_and_count

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # q 8x8, k/v 8x4, o 8x8, gate/up 8x12, down 12x8; N*H = 8
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "max_position_embeddings": 16,
    "tie_word_embeddings": True,
}


def test_flops_match_a_hand_count():
    cfg = config_from_hf(SMALL)
    f = train_step_flops(cfg, r=2, targets=None, batch=1, seq_len=3, remat="fast")
    # Frozen weights per layer: 64 + 32 + 32 + 64 + 96 + 96 + 96 = 480; 4 FLOPs each, 2 layers, 3 tokens.
    assert f["frozen"] == 4 * 480 * 2 * 3 == 11520
    # Adapters r*(in+out) per layer: q 32, k 24, v 24, o 32, gate 40, up 40, down 40 = 232; 6 FLOPs each.
    assert f["adapters"] == 6 * 232 * 2 * 3 == 8352
    # Causal row of 3: 1 + 2 + 3 = 6 keys, 2 layers; 12 FLOPs per key and head dim, N*H = 8.
    assert f["attention"] == 12 * 8 * 6 * 2 == 1152
    assert f["lm_head"] == 4 * 8 * 10 * 3 == 960
    assert f["model"] == 11520 + 8352 + 1152 + 960
    # Recomputed: chunked-loss logits 2*80*3, scores QK^T 2*8*12, x @ A: 2 * 2*(6*8 + 12) * 2 layers * 3.
    assert f["recompute"] == 480 + 192 + 1440
    # lean: every linear but k, v and down again (480 - 32 - 32 - 96 = 320 per layer), their adapters
    # with B (q 32, o 32, gate 40, up 40), x @ A only for k, v and down (16 + 16 + 24); 2 layers, 3 tokens.
    lean = train_step_flops(cfg, 2, None, 1, 3)["recompute"]
    assert lean == 480 + 192 + 2 * 320 * 2 * 3 + 2 * (144 + 56) * 2 * 3
    dots = train_step_flops(cfg, 2, None, 1, 3, remat="dots")["recompute"]
    assert dots == 480 + 192 + 4 * 8 * 12  # the attention forward again, matmul outputs kept
    # Only q/v adapted, on one layer: 6 * (2*16 + 2*12) * 1 layer * 3 tokens.
    qv = train_step_flops(cfg, 2, [("attn", "q_proj"), ("attn", "v_proj")], 1, 3, adapted_layers=1)
    assert qv["adapters"] == 6 * 56 * 3
    assert attended_keys(5, window=2) == 1 + 2 + 2 + 2 + 2
    with pytest.raises(ValueError, match="remat"):
        train_step_flops(cfg, 2, None, 1, 3, remat="some")


def _dot_flops(jaxpr, with_batch_dims: bool) -> int:
    """Matmul FLOPs of a jaxpr, through scans (times their length) and nested jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            if bool(batch) == with_batch_dims:
                k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    total += times * _dot_flops(sub.jaxpr, with_batch_dims)
                elif isinstance(sub, jax_core.Jaxpr):
                    total += times * _dot_flops(sub, with_batch_dims)
    return total


@pytest.mark.parametrize("remat", ["none", "fast", "dots", "lean", "full"])
def test_flops_match_the_matmuls_the_train_step_traces(remat):
    """Linear layers, adapters and LM head (dots without batch dims) in the traced gradient, exactly."""
    cfg = config_from_hf(SMALL).with_runtime(remat=remat)
    lora_cfg = LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(0))
    batch = {k: jnp.ones((2, 5), jnp.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    spec = StepSpec(cfg, 0.0, 4)  # 3 loss chunks, the last one padded: 12 rows of logits
    params, scale = init_params(cfg), jnp.asarray(lora_scale(cfg, lora_cfg))
    grad = jax.grad(lambda lo: loss_and_count(lo, params, batch, scale, None, spec)[0])
    traced = _dot_flops(jax.make_jaxpr(grad)(lora).jaxpr, with_batch_dims=False)
    f = train_step_flops(cfg, 2, None, 2, 5, remat)
    nh, keys = 8, 2 * 2 * attended_keys(5)
    attention_recompute = {"none": 2, "fast": 2, "dots": 6, "lean": 2, "full": 6}[remat] * nh * keys
    pad_logits = 3 * 2 * 8 * 10 * 2  # 2 padded rows of the last loss chunk: forward, recompute, backward
    expected = f["frozen"] + f["adapters"] + f["lm_head"] + f["recompute"] - attention_recompute
    assert traced == expected + pad_logits


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_hybrid_flops_match_the_traced_matmuls(remat, monkeypatch):
    """Qwen3.5's hybrid layers (tests/helpers/hf_tiny.py: 4 DeltaNet and 2 attention layers): each mixer's
    linears count in its own layers only, exactly as the traced gradient runs them.

    The jaxpr is traced without `remat.after_cotangent`: the `jax.vjp` inside it leaves a forward copy
    in the jaxpr that XLA drops, so the compiled program's FLOPs are checked equal with and without it."""
    from jaxlora.models import decoder
    from tests.helpers.hf_tiny import hf_config

    cfg = config_from_hf(hf_config("qwen3_5_text").to_dict()).with_runtime(remat=remat)
    lora_cfg = LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(0))
    batch = {k: jnp.ones((2, 5), jnp.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    spec = StepSpec(cfg, 0.0, 5)  # 2 loss chunks of 5: no padded rows
    params, scale = init_params(cfg), jnp.asarray(lora_scale(cfg, lora_cfg))
    grad = lambda: jax.grad(lambda lo: loss_and_count(lo, params, batch, scale, None, spec)[0])  # noqa: E731
    ordered = _xla_flops(grad(), lora)  # a new function each time: no trace cached by jit
    monkeypatch.setattr(decoder, "after_cotangent", lambda layer: layer)
    assert ordered == pytest.approx(_xla_flops(grad(), lora), rel=0.01)
    traced = _dot_flops(jax.make_jaxpr(grad())(lora).jaxpr, with_batch_dims=False)
    f = train_step_flops(cfg, 2, None, 2, 5, remat)
    nh, keys = cfg.num_heads * cfg.head_dim, 2 * 2 * attended_keys(5)  # 2 attention layers, 2 rows
    delta = 6 * 4 * 8 * 8 * 4 * 10  # 4 value heads of 8 x 8, 4 DeltaNet layers, 10 tokens
    assert f["attention"] == 12 * nh * keys + 3 * delta
    mixing = {"none": 2 * nh * keys, "full": 6 * nh * keys + delta}[remat]
    assert traced == f["frozen"] + f["adapters"] + f["lm_head"] + f["recompute"] - mixing


def test_benchmark_attention_choices_are_the_configs():
    sys.path.insert(0, str(ROOT))  # benchmarks/ sits at the repository root, outside the package
    from benchmarks.spec import ATTENTIONS, BenchSpec

    assert ATTENTIONS == ATTENTION_IMPLS and BenchSpec("x", "tiny", 1, 8).attention == Runtime.attention


def test_benchmark_smoke_jaxlora_and_peft(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--preset", "tiny", "--steps", "2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jaxlora vs PEFT" in proc.stdout
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert set(run["results"]) == {"jaxlora", "peft"} and run["speedup"] > 0
    for fw, r in run["results"].items():
        for key in (
            "tokens_per_s",
            "median_step_s",
            "median_step_cpu_s",
            "peak_memory_bytes",
            "first_step_s",
            "model_flops_per_step",
            "achieved_tflops",
            "mfu",
            "mfu_bf16_peak",
        ):
            assert r[key] > 0, (fw, key, r[key])
        assert r["compile_s"] > 0 if fw == "jaxlora" else r["compile_s"] == 0
        assert np.isfinite(r["loss_first"]) and np.isfinite(r["loss_last"])
        assert r["model_flops_per_step"] == run["results"]["jaxlora"]["model_flops_per_step"]
    assert run["results"]["jaxlora"]["recompute_flops_per_step"] > 0
    assert all(v > 0 for v in report["peaks_flops"].values())


def test_rollout_floor_smoke(tmp_path):
    """The rollout floor report: every row timed, the ceiling transformers' time over the floor."""
    out = tmp_path / "floor.json"
    args = ["--arch", "tiny", "--prompts", "2", "--new-tokens", "4", "--repeats", "1", "--out", str(out)]
    cmd = [sys.executable, "benchmarks/rollout_floor.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    med = {name: r["median_s"] for name, r in report["results"].items()}
    assert set(med) == {"jaxlora", "jaxlora prefill", "decode products", "transformers"}
    assert all(s > 0 for s in med.values())
    assert report["floor_s"] == med["jaxlora prefill"] + med["decode products"]
    assert report["ceiling"] == med["transformers"] / report["floor_s"]
    assert report["speedup"] == med["transformers"] / med["jaxlora"]
    assert "ceiling" in proc.stdout


def test_benchmark_cudnn_on_cpu_is_a_user_error(tmp_path):
    cmd = [sys.executable, "scripts/benchmark.py", "--preset", "tiny", "--frameworks", "jaxlora"]
    proc = subprocess.run(
        [*cmd, "--attention", "cudnn"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "model.attention=cudnn needs an NVIDIA GPU" in proc.stderr and "Traceback" not in proc.stderr


# --- every speed switch gives the same loss and gradient --------------------------------------------------


@pytest.fixture(scope="module")
def stories_setup(stories_dir):
    model = load_model(stories_dir)
    lora_cfg = LoraConfig(r=8, alpha=16.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(model.config, lora_cfg, jax.random.key(1))
    lora = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), a.shape), lora)  # B != 0
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (2, 40)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[0, 17:] = 2  # two packed examples in row 0, padding at the end of row 1
    seg[1, 33:] = 0
    pos = np.concatenate([np.arange(17), np.arange(23)])[None].repeat(2, 0).astype(np.int32)
    targets = np.where(seg > 0, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    batch = {"input_ids": ids, "targets": targets, "positions": pos, "segment_ids": seg}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    scale = jnp.asarray(lora_scale(model.config, lora_cfg))
    return model, lora, scale, batch, _loss_and_grad(model, lora, scale, batch)


def _loss_and_grad(model, lora, scale, batch, chunk=1024, **runtime):
    spec = StepSpec(model.config.with_runtime(**runtime), 0.0, chunk)

    def mean_loss(lo):
        s, n = loss_and_count(lo, model.params, batch, scale, None, spec)
        return s / n

    return jax.jit(jax.value_and_grad(mean_loss))(lora)


@pytest.mark.parametrize(
    "variant",
    [{"remat": "dots"}, {"remat": "full"}, {"chunk": 16}, {"chunk": 80}, {"scan_layers": False}],
    ids=["remat=dots", "remat=full", "loss_chunk=16", "loss_chunk=80", "unrolled"],
)
def test_switches_keep_loss_and_gradient(stories_setup, variant):
    model, lora, scale, batch, (ref_loss, ref_grad) = stories_setup
    loss, grad = _loss_and_grad(model, lora, scale, batch, **variant)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grad, ref_grad)))
    scale_g = max(jax.tree.leaves(jax.tree.map(lambda a: float(jnp.max(jnp.abs(a))), ref_grad)))
    print(f"{variant}: loss {float(loss):.6f}, max |grad diff| {worst:.1e} (max |grad| {scale_g:.1e})")
    assert worst < 1e-5


@pytest.mark.parametrize("t,block", [(40, 16), (40, 64), (64, 16)])
def test_blocked_attention_equals_dense(t, block):
    """Causal blocks (ragged last block), GQA, packed segments, padding, sliding window: output and grads."""
    b, n, k, h = 2, 4, 2, 8
    cfg = dataclasses.replace(config_from_hf(SMALL), num_heads=n, num_kv_heads=k, head_dim=h)
    rng = np.random.default_rng(1)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2
    seg[1, t - 5 :] = 0
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for i in range(1, t):
            pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    valid = (seg != 0)[:, :, None, None]
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * valid
    for window in (0, 5):
        w = jnp.int32(window)

        def dense(q, kk, v, w=w):
            return dot_attention(q, kk, v, attention_mask(pos, seg, pos, seg, w), cfg)

        def blocked(q, kk, v, w=w):
            return causal_attention(q, kk, v, pos, seg, w, block)

        def out_and_grads(fn):
            return fn(q, kk, v), jax.grad(lambda *xs: jnp.sum(fn(*xs) * cot), (0, 1, 2))(q, kk, v)

        (o_block, g_block), (o_dense, g_dense) = jax.jit(
            lambda: (out_and_grads(blocked), out_and_grads(dense))
        )()
        np.testing.assert_allclose(o_block * valid, o_dense * valid, atol=1e-5)
        for a, bb in zip(g_block, g_dense, strict=True):
            np.testing.assert_allclose(a, bb, atol=1e-5)
        assert float(jnp.max(jnp.abs(o_block * ~valid))) == 0.0  # padding queries get zeros


def test_cudnn_attention_refuses_what_it_cannot_run(stories_setup):
    """No silent fallback: off a GPU, or in float32, attention=cudnn is a UserError saying what to do."""
    model, lora, scale, batch, _ = stories_setup
    need = "needs an NVIDIA GPU" if jax.default_backend() != "gpu" else "needs model.compute_dtype bfloat16"
    with pytest.raises(UserError, match=f"model.attention=cudnn {need}"):
        _loss_and_grad(model, lora, scale, batch, attention="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["cudnn", "pallas"])
def test_gpu_attention_matches_xla_on_gpu(stories_setup, attention):
    model, lora, scale, batch, _ = stories_setup
    packed = attention == "pallas"  # cuDNN's public API keeps no packed examples apart: unpacked rows
    if not packed:
        seg = jnp.where(batch["segment_ids"] > 0, 1, 0)
        pos = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
        targets = jnp.where(seg > 0, jnp.roll(batch["input_ids"], -1, axis=1), -100)
        batch = dict(batch, segment_ids=seg, positions=pos, targets=targets)
    kw = {"compute_dtype": "bfloat16", "packed": packed}
    ref_loss, ref_grad = _loss_and_grad(model, lora, scale, batch, attention="xla", **kw)
    loss, grad = _loss_and_grad(model, lora, scale, batch, attention=attention, **kw)
    assert abs(float(loss) - float(ref_loss)) < 2e-2
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-2 * float(jnp.max(jnp.abs(b))) + 1e-6)
