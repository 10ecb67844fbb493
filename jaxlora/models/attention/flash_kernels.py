"""The Pallas (Triton) kernel bodies of `flash.flash_attention`: the forward pass, dq, and dk/dv.

Each body sees one tile: `block_q` queries or `block_k` keys of one (batch row, head), as [tile, Hp]
refs, and the whole row's positions and segment ids as [Tp] refs. The loops run over the range of tiles
`flash.live_tiles` says may hold an allowed pair (the bounds come in as lo/hi refs, one per tile); inside
it `_allowed` masks exactly. Everything is accumulated in float32.

The forward pass is FlashAttention-2's online softmax: a running max m, a running sum l and an unscaled
output per query. An attention sink (gpt-oss) is a logit with no value: the running max starts at the sink
and the running sum at exp(sink - sink) = 1, so the sink joins the denominator and nothing else. The
backward pass recomputes the probabilities from the saved log-sum-exp (natural log, sink included):
p = exp(s - lse), ds = p * (dp - delta) with delta = rowsum(out * d_out), times 1 - tanh^2 under
soft-capping (d/dx of c * tanh(x / c)), and the scale folded in at the end.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
NEG = -1e30  # a masked score: far below any real one, and exp(NEG - m) is 0 without inf - inf


class KernelSpec(NamedTuple):
    """What a kernel body is compiled for (static)."""

    scale: float  # 1 / sqrt(H), H the unpadded head dim
    softcap: float  # 0 = none
    sinks: bool  # whether the sink logits join the softmax
    block_q: int  # queries per tile
    block_k: int  # keys per tile
    groups: int = 1  # G = N / K query heads per key/value head (the dk/dv kernel loops over them)


def _dot(a, b, contract=(1, 1)) -> jax.Array:
    """2-D a . b over a's dim contract[0] and b's dim contract[1], in float32: (1, 1) is a @ b.T,
    (1, 0) a @ b, (0, 0) a.T @ b."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=F32)


def _scores(q, k, spec: KernelSpec) -> tuple[jax.Array, jax.Array | None]:
    """Scaled, soft-capped scores [bq, bk] and tanh(x / c) for the backward pass (None without a cap)."""
    s = _dot(q, k) * spec.scale
    if not spec.softcap:
        return s, None
    th = jnp.tanh(s / spec.softcap)
    return spec.softcap * th, th


def _allowed(q0, q_pos, q_seg, k0, k_pos, k_seg, window) -> jax.Array:
    """Bool [bq, bk]: same non-padding segment, causal by position and by index, inside the window.

    q0/k0: the tiles' first indices; *_pos/*_seg: [bq] and [bk]; window: int32 scalar, 0 = none.
    """
    qi = q0 + jnp.arange(q_pos.shape[0], dtype=jnp.int32)
    ki = k0 + jnp.arange(k_pos.shape[0], dtype=jnp.int32)
    delta = q_pos[:, None] - k_pos[None, :]
    same = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    causal = (delta >= 0) & (ki[None, :] <= qi[:, None])
    return same & causal & ((window == 0) | (delta < window))


def _grad_scores(p, dp, delta, th) -> jax.Array:
    """d loss / d (unscaled q.k) up to the scale: p * (dp - delta), through the soft-cap's tanh."""
    ds = p * (dp - delta[:, None])
    return ds if th is None else ds * (1.0 - th * th)


def forward_kernel(
    window_ref, lo_ref, hi_ref, sinks_ref, pos_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec
):
    """Grid (query tile i, batch b, head n). q/o: [bq, Hp]; k/v: [Tp, Hp] of head n's key head;
    lse: [bq] float32 (0 for padding queries, which get zero outputs)."""
    i, n = pl.program_id(0), pl.program_id(2)
    bq, bk = spec.block_q, spec.block_k
    window, q0 = window_ref[0], i * bq
    q_pos, q_seg = pos_ref[pl.ds(q0, bq)], seg_ref[pl.ds(q0, bq)]
    q = q_ref[...]
    if spec.sinks:  # the sink is the first "key": max = sink, sum = 1
        m0, l0 = jnp.full((bq,), sinks_ref[n], F32), jnp.ones((bq,), F32)
    else:
        m0, l0 = jnp.full((bq,), NEG, F32), jnp.zeros((bq,), F32)

    def tile(j, carry):
        m, l, acc = carry
        k0 = j * bk
        keys = pl.ds(k0, bk)
        s, _ = _scores(q, k_ref[keys, :], spec)
        ok = _allowed(q0, q_pos, q_seg, k0, pos_ref[keys], seg_ref[keys], window)
        s = jnp.where(ok, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, alpha * l + jnp.sum(p, axis=1), acc

    acc0 = jnp.zeros((bq, q.shape[1]), F32)
    m, l, acc = lax.fori_loop(lo_ref[i], hi_ref[i], tile, (m0, l0, acc0))
    real = (q_seg != 0) & (l > 0)
    l = jnp.where(real, l, 1.0)
    o_ref[...] = jnp.where(real[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(real, m + jnp.log(l), 0.0)


def dq_kernel(
    window_ref,
    lo_ref,
    hi_ref,
    pos_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    spec,
):
    """Grid (query tile i, batch b, head n). q/do/dq: [bq, Hp]; k/v: [Tp, Hp]; lse/delta: [bq]."""
    i = pl.program_id(0)
    bq, bk = spec.block_q, spec.block_k
    window, q0 = window_ref[0], i * bq
    q_pos, q_seg = pos_ref[pl.ds(q0, bq)], seg_ref[pl.ds(q0, bq)]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def tile(j, dq):
        k0 = j * bk
        keys = pl.ds(k0, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, th = _scores(q, k, spec)
        ok = _allowed(q0, q_pos, q_seg, k0, pos_ref[keys], seg_ref[keys], window)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        ds = _grad_scores(p, _dot(do, v), delta, th)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = lax.fori_loop(lo_ref[i], hi_ref[i], tile, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def dkv_kernel(
    window_ref,
    lo_ref,
    hi_ref,
    pos_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    spec,
):
    """Grid (key tile j, batch b, key head h). k/v/dk/dv: [bk, Hp]; q/do: [Tp, G, Hp] (the key head's G
    query heads); lse/delta: [G, Tp]. Loops over the G query heads and the query tiles that see tile j."""
    j = pl.program_id(0)
    bq, bk = spec.block_q, spec.block_k
    window, k0 = window_ref[0], j * bk
    k_pos, k_seg = pos_ref[pl.ds(k0, bk)], seg_ref[pl.ds(k0, bk)]
    k, v = k_ref[...], v_ref[...]
    lo, hi = lo_ref[j], hi_ref[j]

    def head(g, carry):
        def tile(i, carry):
            dk, dv = carry
            q0 = i * bq
            rows = pl.ds(q0, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            s, th = _scores(q, k, spec)
            ok = _allowed(q0, pos_ref[rows], seg_ref[rows], k0, k_pos, k_seg, window)
            p = jnp.where(ok, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = _grad_scores(p, _dot(do, v), delta_ref[g, rows], th)
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

        return lax.fori_loop(lo, hi, tile, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, spec.groups, head, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
