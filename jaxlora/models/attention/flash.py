"""`flash_attention`: jaxlora's own FlashAttention-2 in Pallas (Triton backend), forward and backward.

Written here because nothing maintained covers the case: JAX 0.12 removed the example kernel
`jax.experimental.pallas.ops.gpu.attention.mha` that `model.attention=pallas` used to call (and that one
had no GQA, sliding window, soft-capping or sinks), cuDNN's public API keeps no packed examples apart and
has no soft-capping, and no library kernel for Triton takes windows, soft-capping, sinks, segment ids and
GQA together. It runs on the CPU with `interpret=True`, which is how the tests check its numbers.

What it computes is `reference_attention` (plus optional attention sinks): causal by position, packed
segments (segment 0 = padding, never attended to; padding queries get zeros), a sliding window (a traced
int32 scalar, 0 = none), soft-capping c * tanh(s / c) of the scaled scores (static, 0 = none), GQA
(query head n reads key head n // G through the block index maps; keys are never repeated) and sinks, a
float32 [N] logit per head that joins the softmax denominator only and gets a gradient.

How: three `pallas_call`s (`flash_kernels`). The forward pass tiles the queries and loops over key tiles
with an online softmax in float32, saving the output and the log-sum-exp; the backward pass recomputes the
probabilities from them in a dq kernel (query tiles, looping over keys) and a dk/dv kernel (key tiles,
looping over the G query heads and the queries), so memory is O(T), never a [T, T] tensor. Each loop runs
over the range of tiles that `live_tiles` (computed in XLA from per-tile ranges of segment ids and
positions, never a false no) says may hold an allowed pair: tiles above the diagonal, of earlier packed
segments, of padding or outside the window are skipped; inside the range `_allowed` masks exactly, by
position and by index as `blocked` does. T is padded with segment-0 tokens to whole tiles and H with
zeros to a power of two. The output and the log-sum-exp are named RESIDUALS, so the `lean` remat policy
keeps them rather than running the forward pass again.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlora.models.attention.blocked import RESIDUALS
from jaxlora.models.attention.flash_kernels import KernelSpec, dkv_kernel, dq_kernel, forward_kernel

F32 = jnp.float32
try:  # Pallas's Triton options: `CompilerParams` (JAX 0.11, 0.12), `TritonCompilerParams` in older JAX
    TRITON_PARAMS = plgpu.CompilerParams
except AttributeError:
    TRITON_PARAMS = plgpu.TritonCompilerParams


class Tiles(NamedTuple):
    """Padded sizes and tile lengths (powers of two, at least 16 as Triton's dot wants)."""

    length: int  # Tp: T padded to whole tiles of both passes
    head_dim: int  # Hp: H padded to a power of two
    fwd: int  # forward pass: queries and keys per tile
    bwd: int  # backward passes: queries and keys per tile


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def flash_tiles(
    t: int, h: int, itemsize: int = 2, block: int | None = None, block_bwd: int | None = None
) -> Tiles:
    """Tiles for T tokens of head dim H in `itemsize`-byte elements; `block`/`block_bwd` override the
    defaults (forward 128, backward 64 for rows of at most 256 bytes, halved for each doubling beyond,
    so the tiles fit a GPU's registers and shared memory; not tuned on hardware)."""
    hp = max(16, _pow2(h))
    halvings = max(0, (hp * itemsize // 256).bit_length() - 1)
    fwd, bwd = block or max(16, 128 >> halvings), block_bwd or max(16, 64 >> halvings)
    for tile in (fwd, bwd):
        if tile < 16 or tile != _pow2(tile):
            raise ValueError(f"flash attention tiles must be powers of two of at least 16, got {tile}")
    fit = max(16, _pow2(t))
    fwd, bwd = min(fwd, fit), min(bwd, fit)
    big = max(fwd, bwd)
    return Tiles(-(-t // big) * big, hp, fwd, bwd)


class Spec(NamedTuple):
    """The static part of one call."""

    tiles: Tiles
    scale: float
    softcap: float
    sinks: bool
    interpret: bool


def flash_attention(
    q,
    k,
    v,
    positions,
    segment_ids,
    window=0,
    softcap: float = 0.0,
    sinks=None,
    *,
    block=None,
    block_bwd=None,
    interpret=False,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] (N = G * K) -> [B, T, N, H] in q's dtype.

    positions/segment_ids: [B, T] int32; window: int32 scalar, may be traced (0 = none); softcap: static
    float (0 = none); sinks: float32 [N] or None. block/block_bwd: tile lengths (see `flash_tiles`).
    """
    b, t, n, h = q.shape
    if n % k.shape[2]:
        raise ValueError(f"flash attention needs query heads {n} to be a multiple of key heads {k.shape[2]}")
    tiles = flash_tiles(t, h, jnp.dtype(q.dtype).itemsize, block, block_bwd)
    spec = Spec(tiles, h**-0.5, float(softcap), sinks is not None, interpret)
    pad_t = ((0, 0), (0, tiles.length - t))
    q, k, v = (jnp.pad(x, (*pad_t, (0, 0), (0, tiles.head_dim - h))) for x in (q, k, v))
    sinks = jnp.zeros((n,), F32) if sinks is None else jnp.asarray(sinks, F32)
    window = jnp.asarray(window, jnp.int32).reshape(1)
    out = _flash(spec, q, k, v, sinks, jnp.pad(positions, pad_t), jnp.pad(segment_ids, pad_t), window)
    return out[:, :t, :, :h]


# --- which tiles the loops visit ---------------------------------------------------------------------------


class _TileStats(NamedTuple):
    """Per row and tile [B, nt], over its real (non-padding) tokens: whether it has any, and the least
    and greatest segment id and position."""

    real: jax.Array
    seg_lo: jax.Array
    seg_hi: jax.Array
    pos_lo: jax.Array
    pos_hi: jax.Array


def _tile_stats(pos, seg, tile: int) -> _TileStats:
    b, tp = seg.shape
    real = (seg != 0).reshape(b, tp // tile, tile)
    big = jnp.iinfo(jnp.int32).max
    lo = lambda x: jnp.min(jnp.where(real, x.reshape(real.shape), big), axis=2)  # noqa: E731
    hi = lambda x: jnp.max(jnp.where(real, x.reshape(real.shape), -1), axis=2)  # noqa: E731
    return _TileStats(jnp.any(real, axis=2), lo(seg), hi(seg), lo(pos), hi(pos))


def live_tiles(pos, seg, window, tile: int) -> jax.Array:
    """Bool [B, nt, nt], [b, i, j]: query tile i of row b may have an allowed pair with key tile j.

    Never a false no, whatever the positions and segments: both tiles hold real tokens, key tile j does
    not start after query tile i ends, their segment ranges meet, some key position is <= some query
    position and, with a window, some key is within reach. pos/seg: [B, Tp]; window: int32 [1].
    """
    q = k = _tile_stats(pos, seg, tile)  # one tile length for queries and keys
    nt = seg.shape[1] // tile
    w = window[0]
    qs, ks = (slice(None), slice(None), None), (slice(None), None, slice(None))  # [B, i, j] broadcasting
    return (
        (jnp.arange(nt)[:, None] >= jnp.arange(nt)[None, :])
        & q.real[qs]
        & k.real[ks]
        & (q.seg_lo[qs] <= k.seg_hi[ks])
        & (k.seg_lo[ks] <= q.seg_hi[qs])
        & (k.pos_lo[ks] <= q.pos_hi[qs])
        & ((w == 0) | (k.pos_hi[ks] > q.pos_lo[qs] - w))
    )


def tile_ranges(live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) of the live tiles along the last axis of `live` [B, nt, nt] -> [B, nt] each; the loops
    run over that range (a dead tile inside it is masked, not skipped). Empty where none is live."""
    idx = jnp.arange(live.shape[-1], dtype=jnp.int32)
    lo = jnp.min(jnp.where(live, idx, live.shape[-1]), axis=-1)
    hi = jnp.max(jnp.where(live, idx, -1), axis=-1) + 1
    return jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)


# --- the three pallas_calls --------------------------------------------------------------------------------


def _call(kernel, spec: Spec, grid, in_specs, out_specs, out_shape, name: str):
    hp = spec.tiles.head_dim
    params = TRITON_PARAMS(num_warps=4 if hp <= 64 else 8, num_stages=2)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=spec.interpret,
        name=name,
    )


def _row_specs(tile: int, tp: int, nt: int) -> list:
    """Block specs of window [1], tile bounds lo/hi [B, nt] and positions/segment ids [B, Tp] on a grid
    (tile, batch, head)."""
    bounds = pl.BlockSpec((None, nt), lambda i, b, n: (b, 0))
    row = pl.BlockSpec((None, tp), lambda i, b, n: (b, 0))
    return [pl.BlockSpec((1,), lambda i, b, n: (0,)), bounds, bounds, row, row]


def _forward(spec: Spec, q, k, v, sinks, pos, seg, window) -> tuple[jax.Array, jax.Array]:
    """-> out [B, Tp, N, Hp] in q's dtype, lse [B, N, Tp] float32."""
    b, tp, n, hp = q.shape
    g, tile = n // k.shape[2], spec.tiles.fwd
    lo, hi = tile_ranges(live_tiles(pos, seg, window, tile))
    kernel = partial(forward_kernel, spec=KernelSpec(spec.scale, spec.softcap, spec.sinks, tile, tile))
    q_tile = pl.BlockSpec((None, tile, None, hp), lambda i, b, n: (b, i, n, 0))
    kv_row = pl.BlockSpec((None, tp, None, hp), lambda i, b, n: (b, 0, lax.div(n, g), 0))
    rows = _row_specs(tile, tp, tp // tile)
    in_specs = [*rows[:3], pl.BlockSpec((n,), lambda i, b, n: (0,)), *rows[3:], q_tile, kv_row, kv_row]
    lse_tile = pl.BlockSpec((None, None, tile), lambda i, b, n: (b, n, i))
    shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), F32)]
    call = _call(
        kernel, spec, (tp // tile, b, n), in_specs, [q_tile, lse_tile], shapes, "flash_attention_fwd"
    )
    out, lse = call(window, lo, hi, sinks, pos, seg, q, k, v)
    return out, lse


def _dq(spec: Spec, q, k, v, pos, seg, window, d_out, lse, delta) -> jax.Array:
    """dq [B, Tp, N, Hp] in q's dtype."""
    _, tp, n, hp = q.shape
    g, tile = n // k.shape[2], spec.tiles.bwd
    lo, hi = tile_ranges(live_tiles(pos, seg, window, tile))
    kernel = partial(dq_kernel, spec=KernelSpec(spec.scale, spec.softcap, spec.sinks, tile, tile))
    q_tile = pl.BlockSpec((None, tile, None, hp), lambda i, b, n: (b, i, n, 0))
    kv_row = pl.BlockSpec((None, tp, None, hp), lambda i, b, n: (b, 0, lax.div(n, g), 0))
    stat = pl.BlockSpec((None, None, tile), lambda i, b, n: (b, n, i))
    in_specs = [*_row_specs(tile, tp, tp // tile), q_tile, kv_row, kv_row, q_tile, stat, stat]
    grid = (tp // tile, q.shape[0], n)
    call = _call(
        kernel, spec, grid, in_specs, q_tile, jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_attention_dq"
    )
    return call(window, lo, hi, pos, seg, q, k, v, d_out, lse, delta)


def _dkv(spec: Spec, q, k, v, pos, seg, window, d_out, lse, delta) -> tuple[jax.Array, jax.Array]:
    """dk, dv [B, Tp, K, Hp] in k's and v's dtypes: each key head sums over its G query heads."""
    b, tp, kh, hp = k.shape
    g, tile = q.shape[2] // kh, spec.tiles.bwd
    lo, hi = tile_ranges(live_tiles(pos, seg, window, tile).swapaxes(1, 2))
    kernel = partial(dkv_kernel, spec=KernelSpec(spec.scale, spec.softcap, spec.sinks, tile, tile, g))
    kv_tile = pl.BlockSpec((None, tile, None, hp), lambda j, b, h: (b, j, h, 0))
    q_group = pl.BlockSpec((None, tp, g, hp), lambda j, b, h: (b, 0, h, 0))
    stat = pl.BlockSpec((None, g, tp), lambda j, b, h: (b, h, 0))
    in_specs = [*_row_specs(tile, tp, tp // tile), q_group, kv_tile, kv_tile, q_group, stat, stat]
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    call = _call(
        kernel, spec, (tp // tile, b, kh), in_specs, [kv_tile, kv_tile], shapes, "flash_attention_dkv"
    )
    dk, dv = call(window, lo, hi, pos, seg, q, k, v, d_out, lse, delta)
    return dk, dv


# --- the custom VJP ----------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: Spec, q, k, v, sinks, pos, seg, window) -> jax.Array:
    """Padded arrays: q [B, Tp, N, Hp], k/v [B, Tp, K, Hp], sinks [N], pos/seg [B, Tp], window [1]."""
    return _forward(spec, q, k, v, sinks, pos, seg, window)[0]


def _flash_fwd(spec: Spec, q, k, v, sinks, pos, seg, window):
    out, lse = _forward(spec, q, k, v, sinks, pos, seg, window)
    out, lse = checkpoint_name(out, RESIDUALS), checkpoint_name(lse, RESIDUALS)
    return out, (q, k, v, sinks, pos, seg, window, out, lse)


def _flash_bwd(spec: Spec, res, d_out):
    q, k, v, sinks, pos, seg, window, out, lse = res
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(F32), d_out.astype(F32))  # [B, N, Tp]
    d_out = d_out.astype(q.dtype)
    dq = _dq(spec, q, k, v, pos, seg, window, d_out, lse, delta)
    dk, dv = _dkv(spec, q, k, v, pos, seg, window, d_out, lse, delta)
    dsinks = jnp.zeros_like(sinks)
    if spec.sinks:  # d lse / d sink = p_sink = exp(sink - lse); d loss / d sink = -sum p_sink * delta
        p_sink = jnp.exp(sinks[None, :, None] - lse) * (seg != 0)[:, None, :].astype(F32)
        dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))
    return dq, dk, dv, dsinks, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
