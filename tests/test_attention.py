"""Every attention implementation against the float32 reference, and the rules `model.attention` follows.

On the CPU: the reference (against a NumPy loop), the blocked `xla` kernel, Pallas in interpret mode and
cuDNN's exact arguments run through `jax.nn.dot_product_attention(implementation="xla")`. On a GPU
(`-m gpu`): cuDNN and compiled Pallas in bfloat16 against the float32 reference.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.models.attention import (
    KVCache,
    attend,
    attention_block_size,
    causal_attention,
    choose_attention,
    cudnn_attention,
    pallas_attention,
    reference_attention,
)
from jaxlora.models.config import DecoderConfig

B, N, K, H = 2, 4, 2, 8  # GQA: two query heads per key/value head


def _config(t=24, head_dim=H, **runtime) -> DecoderConfig:
    windows = runtime.pop("sliding_windows", (0, 0))
    softcap = runtime.pop("attn_logit_softcap", 0.0)
    sinks = runtime.pop("attn_sinks", False)
    cfg = DecoderConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=N * head_dim,
        intermediate_size=64,
        num_layers=len(windows),
        num_heads=N,
        num_kv_heads=K,
        head_dim=head_dim,
        max_position_embeddings=t,
        norm_eps=1e-6,
        sliding_windows=windows,
        attn_logit_softcap=softcap,
        attn_sinks=sinks,
    )
    return cfg.with_runtime(**runtime)


def _rows(kind: str, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment_ids) [B, T]: "causal" one example per row, "padded" right-padded rows,
    "packed" several examples per row with restarting positions and padding at the end."""
    seg = np.ones((B, t), np.int32)
    if kind == "padded":
        seg[1, t - 7 :] = 0
    elif kind == "packed":
        seg[0, t // 3 :] = 2
        seg[0, t - 4 :] = 0
        seg[1, 5:] = 2
        seg[1, t // 2 :] = 3
    pos = np.zeros((B, t), np.int32)
    for r in range(B):
        for i in range(1, t):
            pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
    return pos, seg


def _inputs(kind: str, t: int = 24, dtype=jnp.float32, head_dim: int = H, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, t, m, head_dim)) for m in (N, K, K))
    q = q * spread  # larger scores, so that soft-capping bites
    pos, seg = _rows(kind, t)
    valid = (seg != 0)[:, :, None, None]
    cot = rng.normal(size=(B, t, N, head_dim)) * valid  # padding queries' outputs are never read
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return (*arrays, jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(cot, jnp.float32), valid)


def _out_and_grads(fn, q, k, v, cot):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


def _rel(a, b) -> float:
    """Largest difference relative to the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(name, fn, kind, window=0, softcap=0.0, tol=1e-5, spread=1.0, t=24, dtype=jnp.float32, **kw):
    """fn's output (real queries) and q/k/v gradients against the float32 reference; returns the errors."""
    q, k, v, pos, seg, cot, valid = _inputs(kind, t, dtype, spread=spread, **kw)
    w = jnp.int32(window)
    ref = _out_and_grads(
        lambda *x: reference_attention(*x, pos, seg, w, softcap),
        *(x.astype(jnp.float32) for x in (q, k, v)),
        cot,
    )
    got = _out_and_grads(lambda *x: fn(*x, pos, seg, window, softcap), q, k, v, cot)
    errors = [_rel(got[0] * valid, ref[0] * valid)] + [
        _rel(a, b) for a, b in zip(got[1], ref[1], strict=True)
    ]
    print(
        f"{name} {kind} window={window} softcap={softcap}: out/dq/dk/dv rel err "
        + " ".join(f"{e:.1e}" for e in errors)
    )
    assert max(errors) < tol, errors
    return got


CASES = [  # (rows, window, softcap, spread)
    ("causal", 0, 0.0, 1.0),
    ("packed", 0, 0.0, 1.0),
    ("padded", 0, 0.0, 1.0),
    ("packed", 5, 0.0, 1.0),
    ("packed", 0, 1.5, 3.0),
    ("packed", 5, 1.5, 3.0),
]
IDS = ["causal", "packed", "padded", "window", "softcap", "window+softcap"]


def test_reference_equals_a_numpy_loop():
    """The ground truth itself, forward, against the definition written out query by query."""
    t, window, softcap = 12, 4, 1.5
    q, k, v, pos, seg, _, _ = _inputs("packed", t, spread=3.0)
    got = np.asarray(reference_attention(q, k, v, pos, seg, jnp.int32(window), softcap))
    q, k, v, pos, seg = (np.asarray(x, np.float64) for x in (q, k, v, pos, seg))
    for b in range(B):
        for i in range(t):
            if seg[b, i] == 0:
                continue
            keys = [j for j in range(t) if seg[b, j] == seg[b, i] and 0 <= pos[b, i] - pos[b, j] < window]
            for n in range(N):
                s = np.array([q[b, i, n] @ k[b, j, n // (N // K)] for j in keys]) / np.sqrt(H)
                s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                want = (p / p.sum()) @ np.stack([v[b, j, n // (N // K)] for j in keys])
                np.testing.assert_allclose(got[b, i, n], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("block", [8, 64], ids=["blocks=8", "one-block"])
def test_xla_matches_reference(case, block):
    kind, window, softcap, spread = case
    (out, _) = _compare(
        "xla",
        lambda q, k, v, p, s, w, c: causal_attention(q, k, v, p, s, w, block, c),
        kind,
        window,
        softcap,
        spread=spread,
    )
    _, seg = _rows(kind, 24)
    assert float(jnp.max(jnp.abs(out * (seg == 0)[:, :, None, None]))) == 0.0  # padding queries get zeros


@pytest.mark.parametrize("kind,window,softcap", [("packed", 5, 1.5)])
def test_pallas_interpret_matches_reference(kind, window, softcap):
    """`pallas_attention` (jaxlora's Pallas kernel, `flash`) in interpret mode passes the window and the
    soft-cap through: tiles of 16 over 24 tokens, padded to 32. tests/test_flash.py checks the kernel
    itself (GQA, sinks, bfloat16, tile skipping)."""

    def fn(q, k, v, p, s, w, c):
        return pallas_attention(q, k, v, p, s, w, c, block=16, block_bwd=16, interpret=True)

    _compare("pallas(interpret)", fn, kind, window, softcap, spread=3.0)


@pytest.mark.parametrize("kind,window", [("packed", 0), ("padded", 5)])
def test_sinks_in_reference_xla_pallas_and_kv_cache_agree(kind, window):
    """Attention sinks (gpt-oss): the blocked kernel (tiles of 8 over 24 tokens) and Pallas in interpret
    mode (checked against transformers' gpt-oss attention in tests/test_flash.py) against the reference,
    output and dq, dk, dv, d sinks; the KV-cache path (`attend` with a cache) against the reference."""
    q, k, v, pos, seg, cot, valid = _inputs(kind)
    sinks = jnp.asarray(np.random.default_rng(1).normal(size=(N,)) * 2, jnp.float32)
    w = jnp.int32(window)

    def run(fn):
        def loss(*args):
            return jnp.sum(fn(*args).astype(jnp.float32) * cot)

        return jax.jit(lambda *a: (fn(*a), jax.grad(loss, (0, 1, 2, 3))(*a)))(q, k, v, sinks)

    ref = run(lambda q, k, v, s: reference_attention(q, k, v, pos, seg, w, 0.0, s))
    kernels = {
        "xla": lambda q, k, v, s: causal_attention(q, k, v, pos, seg, w, 8, 0.0, s),
        "pallas": lambda q, k, v, s: pallas_attention(
            q, k, v, pos, seg, w, sinks=s, block=16, block_bwd=16, interpret=True
        ),
    }
    for name, fn in kernels.items():
        got = run(fn)
        errors = [_rel(got[0] * valid, ref[0] * valid)]
        errors += [_rel(a, b) for a, b in zip(got[1], ref[1], strict=True)]
        print(
            f"{name} sinks {kind} window={window}: out/dq/dk/dv/dsinks rel err "
            + " ".join(f"{e:.1e}" for e in errors)
        )
        assert max(errors) < 1e-5, errors
    cache = KVCache(jnp.zeros_like(k), jnp.zeros_like(v), pos, seg, jnp.int32(0))  # one layer's slice
    cached, _ = attend(q, k, v, _config(attn_sinks=True), pos, seg, w, cache, sinks)
    assert _rel(cached * valid, ref[0] * valid) < 1e-6
    no_sinks = reference_attention(q, k, v, pos, seg, w)
    assert _rel(ref[0] * valid, no_sinks * valid) > 1e-2  # the sinks did change the output


@pytest.mark.parametrize("kind,window", [("causal", 0), ("padded", 0), ("padded", 5), ("causal", 5)])
def test_cudnn_arguments_match_reference_via_xla(kind, window):
    """cuDNN's exact arguments (sequence lengths, `local_window_size`), run by JAX's XLA implementation."""
    fn = lambda q, k, v, p, s, w, c: cudnn_attention(q, k, v, p, s, w, c, implementation="xla")  # noqa: E731
    _compare("cudnn-args(xla)", fn, kind, window)


def test_kv_cache_path_applies_softcap():
    """Generation (the dense path over the cache) soft-caps as training does."""
    t = 10
    cfg = _config(t, attn_logit_softcap=1.5)
    q, k, v, pos, seg, _, _ = _inputs("padded", t, spread=3.0)
    cache = KVCache(jnp.zeros_like(k), jnp.zeros_like(v), pos, seg, jnp.int32(0))  # one layer's slice
    out, _ = attend(q, k, v, cfg, pos, seg, jnp.int32(0), cache)
    want = reference_attention(q, k, v, pos, seg, jnp.int32(0), 1.5)
    valid = (seg != 0)[:, :, None, None]
    assert _rel(out * valid, want * valid) < 1e-6
    assert _rel(want, reference_attention(q, k, v, pos, seg, jnp.int32(0))) > 1e-2  # the cap did bite


def test_auto_is_xla_on_cpu_and_follows_the_rules_on_gpu(caplog):
    bf16, t = jnp.bfloat16, 2048
    assert choose_attention(_config(t), jnp.float32, t, backend="cpu") == "xla"
    assert choose_attention(_config(t, packed=False), bf16, t, backend="cpu") == "xla"
    gpu = [
        ("cudnn", _config(t, packed=False)),
        ("cudnn", _config(t, packed=False, sliding_windows=(512, 512))),
        ("pallas", _config(t)),  # packed rows: cuDNN cannot keep them apart
        ("pallas", _config(t, sliding_windows=(0, 4096))),  # a window >= T drops nothing
        ("pallas", _config(t, packed=False, attn_logit_softcap=50.0)),  # cuDNN has no soft-capping
        ("pallas", _config(t, packed=False, attn_sinks=True)),  # nor attention sinks (gpt-oss)
        ("pallas", _config(t, packed=False, sliding_windows=(0, 512))),  # windows differ between layers
        ("pallas", _config(t, sliding_windows=(512, 512))),  # packed and windowed
        ("reference", _config(t, 512, packed=False)),  # head dim 512: neither kernel
    ]
    for want, cfg in gpu:
        assert choose_attention(cfg, bf16, t, backend="gpu") == want, cfg
    assert choose_attention(_config(t, packed=False), jnp.float32, t, backend="gpu") == "pallas"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the notice comes once
            choose_attention(_config(t, 512), bf16, t, backend="gpu")
    notice = [r.getMessage() for r in caplog.records if "model.attention=auto" in r.getMessage()]
    assert len(notice) == 1 and "packed" in notice[0] and "head dim of at most 256" in notice[0], notice


@pytest.mark.parametrize(
    "impl,runtime,backend,says",
    [
        ("cudnn", {}, "cpu", "needs an NVIDIA GPU"),
        ("pallas", {}, "cpu", "needs an NVIDIA GPU"),
        ("cudnn", {}, "gpu", "cannot keep packed examples apart"),
        (
            "cudnn",
            {"packed": False, "sliding_windows": (0, 512)},
            "gpu",
            "cannot apply sliding windows that differ",
        ),
        ("pallas", {"head_dim": 512}, "gpu", "needs a head dim of at most 256"),
    ],
)
def test_impossible_explicit_request_is_one_line_user_error(impl, runtime, backend, says):
    cfg = _config(2048, attention=impl, **runtime)
    with pytest.raises(UserError, match=f"model.attention={impl} {says}") as err:
        choose_attention(cfg, jnp.bfloat16, 2048, backend=backend)
    assert "\n" not in str(err.value) and "model.attention=auto" in str(err.value)
    # through the layer as well, on this machine's backend
    if backend == jax.default_backend():
        q, k, v, pos, seg, _, _ = _inputs("causal", 32, jnp.bfloat16)
        with pytest.raises(UserError, match=f"model.attention={impl}"):
            attend(q, k, v, _config(32, attention=impl, **runtime), pos, seg, jnp.int32(0))


def test_attend_runs_the_chosen_kernel_on_cpu():
    """`auto` through `attend` on this (CPU) machine equals the blocked kernel; `reference` the reference."""
    if jax.default_backend() == "gpu":
        return  # the GPU choices are checked in test_gpu_attention_*
    q, k, v, pos, seg, _, valid = _inputs("packed", 24)
    w = jnp.int32(5)
    auto, _ = attend(q, k, v, _config(24), pos, seg, w)
    blocked = causal_attention(q, k, v, pos, seg, w, attention_block_size(24))
    np.testing.assert_array_equal(auto, blocked)
    ref, _ = attend(q, k, v, _config(24, attention="reference"), pos, seg, w)
    assert _rel(ref * valid, blocked * valid) < 1e-5


# --- on a GPU ----------------------------------------------------------------------------------------------


GPU_T, GPU_H = 200, 64  # not a whole number of Pallas tiles: padded to 256


@pytest.mark.gpu
@pytest.mark.parametrize("kind,window", [("causal", 0), ("padded", 0), ("padded", 64)])
def test_gpu_cudnn_bfloat16_matches_float32_reference(kind, window):
    _compare(
        "cudnn bf16", cudnn_attention, kind, window, tol=1e-2, t=GPU_T, dtype=jnp.bfloat16, head_dim=GPU_H
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,window,softcap", [("causal", 0, 0.0), ("packed", 0, 0.0), ("padded", 0, 0.0), ("packed", 64, 30.0)]
)
def test_gpu_pallas_bfloat16_matches_float32_reference(kind, window, softcap):
    _compare(
        "pallas bf16",
        pallas_attention,
        kind,
        window,
        softcap,
        tol=1e-2,
        t=GPU_T,
        dtype=jnp.bfloat16,
        head_dim=GPU_H,
    )


@pytest.mark.gpu
def test_gpu_auto_picks_by_the_rules():
    t = GPU_T
    picks = {
        "cudnn": _config(t, GPU_H, packed=False),
        "pallas": _config(t, GPU_H, attn_logit_softcap=30.0),
    }
    q, k, v, pos, seg, _, valid = _inputs("padded", t, jnp.bfloat16, head_dim=GPU_H)
    for want, cfg in picks.items():
        assert choose_attention(cfg, jnp.bfloat16, t) == want
        out, _ = jax.jit(lambda q, k, v, cfg=cfg: attend(q, k, v, cfg, pos, seg, jnp.int32(0)))(q, k, v)
        ref = reference_attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), pos, seg, jnp.int32(0), cfg.attn_logit_softcap
        )
        err = _rel(out * valid, ref * valid)
        print(f"auto -> {want}: rel err {err:.1e}")
        assert err < 1e-2


# --- the blocked kernel at longer T: fixed tiles, skipped tiles, O(T) memory --------------------------------


LONG_CASES = [  # (rows, T, block, window, softcap, spread): T never a whole number of blocks
    ("packed", 300, 64, 0, 0.0, 1.0),
    ("padded", 300, 64, 37, 0.0, 1.0),
    ("packed", 300, 64, 37, 1.5, 3.0),
    ("causal", 203, 32, 70, 1.5, 3.0),
    ("padded", 203, 16, 16, 1.5, 3.0),  # a window of exactly one block
]


@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: f"{c[0]}-T{c[1]}-b{c[2]}-w{c[3]}-c{c[4]}")
def test_xla_long_rows_match_reference(case):
    """Several tiles a row, a ragged last one (padded up to a whole block), windows reaching across
    blocks and soft-capping: output and gradients equal the reference's, padding queries get zeros."""
    kind, t, block, window, softcap, spread = case
    fn = lambda q, k, v, p, s, w, c: causal_attention(q, k, v, p, s, w, block, c)  # noqa: E731
    out, _ = _compare("xla", fn, kind, window, softcap, spread=spread, t=t)
    _, seg = _rows(kind, t)
    assert float(jnp.max(jnp.abs(out * (seg == 0)[:, :, None, None]))) == 0.0


@pytest.mark.parametrize("window", [0, 100])
def test_xla_bfloat16_long_rows_match_float32_reference(window):
    """bfloat16 q, k, v (float32 accumulation inside) against the float32 reference."""
    fn = lambda q, k, v, p, s, w, c: causal_attention(q, k, v, p, s, w, 64, c)  # noqa: E731
    _compare("xla bf16", fn, "packed", window, 2.0, tol=1e-2, spread=3.0, t=333, dtype=jnp.bfloat16)


def test_xla_computes_only_live_tiles():
    """Whole tiles are skipped: keys after their queries, padding, keys out of a window's reach and
    other packed segments. A causal row computes nb * (nb + 1) / 2 of the nb^2 tiles, a window a band."""
    from jaxlora.models.attention.blocked import _live_tiles

    def live(seg, pos, window, block=16):
        blocks = lambda x: jnp.asarray(x, jnp.int32).reshape(1, -1, block).transpose(1, 0, 2)  # noqa: E731
        return np.asarray(_live_tiles(blocks(pos), blocks(seg), jnp.int32(window)))

    nb, block = 8, 16
    t = nb * block
    ar, ones = np.arange(t), np.ones(t)
    causal = np.tril(np.ones((nb, nb), bool))
    np.testing.assert_array_equal(live(ones, ar, 0), causal)
    for window, back in [(40, 3), (32, 2), (17, 1), (16, 1), (1, 0)]:
        # key block i - d holds a key within `window` of a query of block i iff d * 16 - 15 < window
        band = causal & ~np.tril(np.ones((nb, nb), bool), -back - 1)
        np.testing.assert_array_equal(live(ones, ar, window), band, err_msg=f"window {window}")
    padded = np.where(ar < 5 * block, 1, 0)  # the last 3 blocks are padding: none of their tiles runs
    want = causal.copy()
    want[5:], want[:, 5:] = False, False
    np.testing.assert_array_equal(live(padded, ar, 0), want)
    packed = np.where(ar < 4 * block, 1, 2)  # two documents of 4 blocks: no tile across them
    pos = np.where(ar < 4 * block, ar, ar - 4 * block)
    want = causal.copy()
    want[4:, :4] = False
    np.testing.assert_array_equal(live(packed, pos, 0), want)


def _fwd_bwd_compiled(t: int, n=8, kh=2, h=16, dtype=jnp.bfloat16):
    """The compiled forward + backward of `causal_attention` at the block `attention_block_size(T)`."""
    sd = jax.ShapeDtypeStruct

    def fn(q, k, v, pos, seg, w):
        loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, pos, seg, w, attention_block_size(t), 50.0))  # noqa: E731
        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    args = [sd((1, t, n, h), dtype), sd((1, t, kh, h), dtype), sd((1, t, kh, h), dtype)]
    args += [sd((1, t), jnp.int32), sd((1, t), jnp.int32), sd((), jnp.int32)]
    return jax.jit(fn).lower(*args).compile()


def test_xla_memory_and_program_are_linear_in_t():
    """Temp memory at most doubles with T (fixed tiles: no [T, T] or [T/16, T] scores), and the program
    is the same loops whatever T (no unrolling over blocks)."""
    small, large = _fwd_bwd_compiled(2048), _fwd_bwd_compiled(8192)
    ratio = large.memory_analysis().temp_size_in_bytes / small.memory_analysis().temp_size_in_bytes
    print(f"temp 8192 / 2048 tokens: {ratio:.2f}")
    assert ratio < 4.4  # two doublings of T at most 2.2x each
    ops = lambda c: len(re.findall(r"^\s*%?\S+ = ", c.as_text(), re.M))  # noqa: E731
    assert abs(ops(large) - ops(small)) <= 0.05 * ops(small), (ops(small), ops(large))


def test_xla_residuals_are_named_for_the_remat_policy(capsys):
    """Under `save_only_these_names(RESIDUALS)` (the `lean` policy) the output and log-sum-exp are kept
    by name: the backward pass does not run the attention forward again."""
    from jax.ad_checkpoint import print_saved_residuals

    from jaxlora.models.attention import RESIDUALS

    q, k, v, pos, seg, _, _ = _inputs("packed", 100)
    policy = jax.checkpoint_policies.save_only_these_names(RESIDUALS)
    fn = jax.checkpoint(lambda q, k, v: jnp.sum(causal_attention(q, k, v, pos, seg, 5, 32)), policy=policy)
    capsys.readouterr()
    print_saved_residuals(fn, q, k, v)
    saved = capsys.readouterr().out
    assert saved.count(f"named '{RESIDUALS}'") == 2, saved
