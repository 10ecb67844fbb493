"""jaxlora's Pallas flash attention (`jaxlora.models.attention.flash`), run in interpret mode on the CPU.

Values and gradients against the float32 references: `reference_attention` (packed rows with padding,
GQA, a traced sliding window, soft-capping, T not a whole number of tiles, float32 and bfloat16) and,
for attention sinks, gpt-oss's own attention in transformers (PyTorch autograd gives d sinks). The tile
skipping is checked against the dense mask. The CUDA lowering is in tests/test_lowering.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.attention import attention_mask, reference_attention
from jaxlora.models.attention.flash import flash_attention, live_tiles, tile_ranges

B, T, N, K, H = 2, 40, 4, 2, 8  # GQA (two query heads per key head); T = 40 is no whole number of tiles
TILES = dict(block=32, block_bwd=16, interpret=True)  # padded to 64: two forward tiles, four backward


def _rows(t: int = T) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment_ids) [B, T]: packed rows, restarting positions; row 0 ends in padding."""
    seg = np.ones((B, t), np.int32)
    seg[0, 13:], seg[0, 35:] = 2, 0
    seg[1, 5:], seg[1, 20:] = 2, 3
    pos = np.zeros((B, t), np.int32)
    for i in range(1, t):
        pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
    return pos, seg


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, m, H)).astype(np.float32) for m in (N, K, K))
    pos, seg = _rows()
    valid = (seg != 0)[:, :, None, None]
    cot = (rng.normal(size=(B, T, N, H)) * valid).astype(np.float32)  # padding outputs are never read
    sinks = rng.normal(size=(N,)).astype(np.float32) * 2
    return dict(q=3 * q, k=k, v=v, pos=pos, seg=seg, cot=cot, valid=valid, sinks=sinks)


def _rel(a, b) -> float:
    """Largest difference relative to the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _out_and_grads(fn, cot):
    """jit of (q, k, v, *rest) -> (fn's output, d/d(each float argument) of sum(output * cot))."""

    def both(*args):
        floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)  # noqa: E731
        return fn(*args), jax.grad(loss, floats)(*args)

    return jax.jit(both)


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["plain", "softcap"])
def test_float32_matches_reference_with_a_traced_window(data, softcap):
    """One compiled function (the window is a traced argument) for windows 0 and 5, 1e-5 of the reference."""
    d = data
    pos, seg, cot = d["pos"], d["seg"], d["cot"]
    ours = _out_and_grads(lambda q, k, v, w: flash_attention(q, k, v, pos, seg, w, softcap, **TILES), cot)
    ref = _out_and_grads(lambda q, k, v, w: reference_attention(q, k, v, pos, seg, w, softcap), cot)
    outs = {}
    for window in (0, 5):
        w = jnp.int32(window)
        (out, grads), (want, want_grads) = ours(d["q"], d["k"], d["v"], w), ref(d["q"], d["k"], d["v"], w)
        outs[window] = out * d["valid"]
        errors = [_rel(out * d["valid"], want * d["valid"])]
        errors += [_rel(a, b) for a, b in zip(grads[:3], want_grads[:3], strict=True)]
        print(
            f"softcap={softcap} window={window}: out/dq/dk/dv rel err " + " ".join(f"{e:.1e}" for e in errors)
        )
        assert max(errors) < 1e-5, errors
        assert float(jnp.max(jnp.abs(out * (1 - d["valid"])))) == 0.0  # padding queries get zeros
    assert _rel(outs[5], outs[0]) > 1e-2  # the window did drop keys


def _gpt_oss_attention(q, k, v, mask, sinks, cot):
    """transformers' gpt-oss eager attention (its real module holding the sinks) and its autograd
    gradients: q [B, T, N, H], k/v [B, T, K, H], mask bool [B, 1, T, T], sinks [N] (NumPy) ->
    (out [B, T, N, H], (dq, dk, dv, dsinks))."""
    import torch
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, eager_attention_forward

    cfg = GptOssConfig(
        hidden_size=N * H,
        num_attention_heads=N,
        num_key_value_heads=K,
        head_dim=H,
        num_hidden_layers=1,
        vocab_size=32,
        intermediate_size=16,
        num_local_experts=2,
    )
    module = GptOssAttention(cfg, 0).eval()
    with torch.no_grad():
        module.sinks.copy_(torch.from_numpy(sinks))
    qt, kt, vt = (torch.from_numpy(np.array(x)).transpose(1, 2).requires_grad_() for x in (q, k, v))
    additive = torch.where(torch.from_numpy(np.array(mask)), 0.0, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(module, qt, kt, vt, additive, scaling=H**-0.5)  # [B, T, N, H]
    (out * torch.from_numpy(cot)).sum().backward()
    grads = [x.grad.transpose(1, 2).numpy() for x in (qt, kt, vt)] + [module.sinks.grad.numpy()]
    return out.detach().numpy(), grads


def test_sinks_match_transformers_gpt_oss(data):
    """Attention sinks (gpt-oss): output and dq, dk, dv, d sinks against transformers' eager attention."""
    d = data
    pos, seg = d["pos"], d["seg"]
    fn = _out_and_grads(
        lambda q, k, v, s, w: flash_attention(q, k, v, pos, seg, w, 0.0, s, **TILES), d["cot"]
    )
    for window in (0, 6):
        out, grads = fn(d["q"], d["k"], d["v"], d["sinks"], jnp.int32(window))
        mask = attention_mask(pos, seg, pos, seg, jnp.int32(window))
        want, want_grads = _gpt_oss_attention(d["q"], d["k"], d["v"], mask, d["sinks"], d["cot"])
        errors = [_rel(out * d["valid"], want * d["valid"])]
        errors += [_rel(a, b) for a, b in zip(grads, want_grads, strict=True)]
        print(f"sinks window={window}: out/dq/dk/dv/dsinks rel err " + " ".join(f"{e:.1e}" for e in errors))
        assert max(errors) < 1e-5, errors
    no_sinks = reference_attention(d["q"], d["k"], d["v"], pos, seg, jnp.int32(window))
    assert _rel(out * d["valid"], no_sinks * d["valid"]) > 1e-2  # the sinks did change the output


def test_bfloat16_matches_float32_reference(data):
    """bfloat16 inputs (float32 accumulation inside) against the float32 reference, within 2e-2."""
    d = data
    pos, seg = d["pos"], d["seg"]
    bf = [jnp.asarray(d[x], jnp.bfloat16) for x in "qkv"]
    w = jnp.int32(5)
    out, grads = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, pos, seg, w, **TILES), d["cot"])(*bf)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in bf]
    want, want_grads = _out_and_grads(lambda q, k, v: reference_attention(q, k, v, pos, seg, w), d["cot"])(
        *f32
    )
    errors = [_rel(out * d["valid"], want * d["valid"])]
    errors += [_rel(a, b) for a, b in zip(grads, want_grads, strict=True)]
    print("bf16: out/dq/dk/dv rel err " + " ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < 2e-2, errors


def _visited(pos, seg, window, tile):
    """Bool [B, nt, nt] of the (query tile, key tile) pairs the forward loops visit, and of those that hold
    a pair the dense mask allows (and the index-causal mask the kernels add, as `blocked` does)."""
    nt = seg.shape[1] // tile
    lo, hi = tile_ranges(live_tiles(jnp.asarray(pos), jnp.asarray(seg), jnp.int32([window]), tile))
    j = np.arange(nt)
    visited = (j >= np.asarray(lo)[..., None]) & (j < np.asarray(hi)[..., None])
    mask = np.array(attention_mask(pos, seg, pos, seg, jnp.int32(window)))[:, 0]  # [B, T, T]
    mask &= np.tri(seg.shape[1], dtype=bool)  # a key after its query in the row is never one
    needed = mask.reshape(B, nt, tile, nt, tile).any(axis=(2, 4))
    return visited, needed


def test_tile_skipping_visits_every_needed_tile_and_skips_the_rest():
    """On packed rows the loops skip the tiles above the diagonal, of earlier segments, of padding and,
    with a window, those out of reach: without a window they visit exactly the tiles holding an allowed
    pair. On random segments and positions no such tile is ever skipped (the per-tile test, from ranges
    of segment ids and positions, may say a false yes but never a false no)."""
    pos, seg = _rows(48)
    seg[1, 44:] = 0
    visited, needed = _visited(pos, seg, 0, 8)
    np.testing.assert_array_equal(visited, needed)
    assert visited.sum() < B * 6 * 7 // 2  # fewer than the causal triangle's tiles
    windowed, needed = _visited(pos, seg, 5, 8)
    assert not (needed & ~windowed).any() and windowed.sum() < visited.sum()
    rng = np.random.default_rng(0)
    for window in (0, 3, 7):
        seg = rng.integers(0, 3, size=(B, 48)).astype(np.int32)
        pos = rng.integers(0, 48, size=(B, 48)).astype(np.int32)
        visited, needed = _visited(pos, seg, window, 8)
        assert not (needed & ~visited).any()
