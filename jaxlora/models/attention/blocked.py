"""`causal_attention` (model.attention=xla): tiled causal attention with a flash-style backward pass.

Hand-written rather than the dense reference under autodiff or `jax.nn.dot_product_attention(
implementation="xla")`, for two reasons measured on XLA:CPU (where there is no fused attention kernel):
- Memory, O(T) for a fixed block: the sequence is cut into blocks of `block` queries and as many keys,
  and no tensor larger than one [block, block] tile of scores is ever built. The forward pass is
  FlashAttention-2's: for each query block a loop over key blocks keeps a running max, sum and output
  (online softmax). The custom VJP keeps only q, k, v, the output and the log-sum-exp per query
  (FlashAttention's residuals); the backward pass loops over key blocks, and for each over the query
  blocks that see it, recomputes that tile's probabilities from the log-sum-exp and accumulates dq, dk
  and dv. The loops are `lax.scan`/`lax.fori_loop` over blocks picked by `lax.dynamic_index_in_dim`, so
  the compiled graph (and the compile time) does not grow with T.
- Work: a tile is live if one of its (query, key) pairs may be allowed (`_live_tiles`, from per-block
  ranges of segment ids and positions), and each loop runs from the first live tile to the last: keys
  after their queries, padding, earlier packed segments and, with a sliding window, keys too far back are
  skipped by whole tiles, so about half of the [T, S] score matrix (a band of about window + block keys
  per query with a window) is computed. Every matmul is laid out as
  [batch, M, contract] x [batch, contract, N] with one contracting dimension (query rows m = (t, g)
  flattened), which XLA:CPU runs without transposing the large operand.

Soft-capping (Gemma 2) replaces the scaled score s by c * tanh(s / c); its derivative 1 - tanh^2(s / c)
multiplies the score gradient in the backward pass. Attention sinks (gpt-oss: a logit per query head that
joins the softmax denominator) start each query's online softmax at (max = sink, sum = 1), so the
log-sum-exp includes them; the backward pass is unchanged but for the sinks' own gradient,
-sum over queries of p_sink * delta.

Shapes: B batch, T queries (= keys S), N query heads, K key/value heads, G = N / K, H head dim; the
sequence is padded (segment 0) to Tp = nb * bq, nb blocks of bq positions, bm = bq * G query rows a block.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

F32 = jnp.float32
NEG_INF = float(jnp.finfo(jnp.float32).min)
TINY = float(jnp.finfo(jnp.float32).tiny)
RESIDUALS = "attention_residuals"  # checkpoint name of what the attention backward pass reads
INT_MAX = int(jnp.iinfo(jnp.int32).max)


def attention_block_size(t: int) -> int:
    """Query and key block length of `causal_attention` for T tokens: 64 up to 256, 128 up to 1024, else 256.

    Bounded whatever T, so memory is O(T): a tile of scores is [B, N, block, block] float32. Measured on
    XLA:CPU (forward + backward, benchmarks/attention_memory.py): short rows with many of them (stories260K,
    B=8) are fastest in small tiles, long rows in tiles of 256.
    """
    return 64 if t <= 256 else 128 if t <= 1024 else 256


def _allowed(q_pos, q_seg, q_idx, k_pos, k_seg, k_idx, window) -> jax.Array:
    """Broadcastable bool: same non-padding segment, causal by position and by index, inside the window."""
    delta = q_pos - k_pos
    return (
        (q_seg == k_seg) & (k_seg != 0) & (delta >= 0) & ((window == 0) | (delta < window)) & (k_idx <= q_idx)
    )


def _capped(s: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array | None]:
    """(scores after soft-capping, tanh(s / c) for the backward pass, or None when softcap is 0)."""
    if not softcap:
        return s, None
    th = jnp.tanh(s / softcap)
    return softcap * th, th


def _live_tiles(pos_b, seg_b, window) -> jax.Array:
    """Bool [nb, nb], [i, j]: query block i may attend to key block j in some row (never a false no).

    pos_b, seg_b: [nb, B, bq]. Per row and block: the range of segment ids and positions of its real
    (non-padding) tokens; a tile is live if key block j <= i, both blocks hold real tokens, the segment
    ranges meet, some key position is <= some query position and, with a window, some key is in reach.
    """
    real = seg_b != 0
    lo = lambda x: jnp.min(jnp.where(real, x, INT_MAX), axis=-1)  # noqa: E731  [nb, B]
    hi = lambda x: jnp.max(jnp.where(real, x, -1), axis=-1)  # noqa: E731
    smin, smax, pmin, pmax = lo(seg_b), hi(seg_b), lo(pos_b), hi(pos_b)
    q, k = (slice(None), None), (None, slice(None))  # [i, j, B] broadcasting of per-block stats
    nb = seg_b.shape[0]
    live = (
        (jnp.arange(nb)[:, None, None] >= jnp.arange(nb)[None, :, None])
        & jnp.any(real, -1)[q]
        & jnp.any(real, -1)[k]
        & (smin[q] <= smax[k])
        & (smin[k] <= smax[q])
        & (pmin[k] <= pmax[q])
        & ((window == 0) | (pmax[k] > pmin[q] - window))
    )
    return jnp.any(live, axis=-1)


def _span(live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first, last) live index along the last axis of `live` [nb, nb]; (0, -1) where none is live."""
    idx = jnp.arange(live.shape[-1])
    first = jnp.min(jnp.where(live, idx, live.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(live, idx, -1), axis=-1)
    return jnp.where(last >= 0, first, 0), last


class _Blocks:
    """The padded, blocked layout of one call: nb blocks of bq positions, shared by both passes."""

    def __init__(self, q, k, positions, segment_ids, block: int):
        b, t, n, h = q.shape
        self.b, self.t, self.h, self.kh = b, t, h, k.shape[2]
        self.g = n // self.kh
        self.bq = min(block, t)
        self.nb = -(-t // self.bq)
        self.tp = self.nb * self.bq
        self.pos = self.rows(positions)  # [nb, B, bq]
        self.seg = self.rows(segment_ids)

    def rows(self, x) -> jax.Array:
        """[B, T] -> [nb, B, bq], padded with zeros (segment 0: padding)."""
        x = jnp.pad(x, ((0, 0), (0, self.tp - self.t)))
        return x.reshape(self.b, self.nb, self.bq).transpose(1, 0, 2)

    def sink_rows(self, sinks) -> jax.Array:
        """Sink logits [N] -> [K, bm], one per query row (t, g) of a block (row m = t * G + g)."""
        per_head = sinks.astype(F32).reshape(self.kh, 1, self.g)
        return jnp.broadcast_to(per_head, (self.kh, self.bq, self.g)).reshape(self.kh, self.bq * self.g)

    def heads(self, x, transposed: bool = False) -> jax.Array:
        """[B, T, K*G', H] -> [nb, B, K, bq*G', H], or [nb, B, K, H, bq*G'] if `transposed`."""
        b, t, n, h = x.shape
        x = jnp.pad(x, ((0, 0), (0, self.tp - t), (0, 0), (0, 0)))
        x = x.reshape(b, self.nb, self.bq, self.kh, n // self.kh, h)  # [B, nb, bq, K, G', H]
        perm = (1, 0, 3, 5, 2, 4) if transposed else (1, 0, 3, 2, 4, 5)
        shape = (h, -1) if transposed else (-1, h)
        return x.transpose(perm).reshape(self.nb, b, self.kh, *shape)

    def unheads(self, x) -> jax.Array:
        """[nb, B, K, bq*G', H] -> [B, T, K*G', H]: the inverse of `heads`."""
        x = x.reshape(self.nb, self.b, self.kh, self.bq, -1, self.h).transpose(1, 0, 3, 2, 4, 5)
        return x.reshape(self.b, self.tp, -1, self.h)[:, : self.t]

    def mask(self, i, j, window, kv_major: bool = False) -> jax.Array:
        """Bool [B, K, bm, bk] of query block i against key block j ([B, K, bk, bm] if `kv_major`)."""
        at = lambda x, a: jax.lax.dynamic_index_in_dim(x, a, keepdims=False)  # noqa: E731
        qi, ki = i * self.bq + jnp.arange(self.bq), j * self.bq + jnp.arange(self.bq)
        qp, qs, kp, ks = at(self.pos, i), at(self.seg, i), at(self.pos, j), at(self.seg, j)
        ok = _allowed(qp[:, :, None], qs[:, :, None], qi[:, None], kp[:, None], ks[:, None], ki[None], window)
        # Built once as [B, bq, bk]: fused into the [B, K, bm, bk] score loops, XLA:CPU would compute it
        # again for every head (10-15% of a pass at head dim 64, measured).
        ok = jax.lax.optimization_barrier(ok.swapaxes(1, 2) if kv_major else ok)
        b, kh, g, bq = self.b, self.kh, self.g, self.bq
        if kv_major:  # [B, bk, bq] -> [B, K, bk, bq, G]
            return jnp.broadcast_to(ok[:, None, :, :, None], (b, kh, bq, bq, g)).reshape(b, kh, bq, bq * g)
        return jnp.broadcast_to(ok[:, None, :, None], (b, kh, bq, g, bq)).reshape(b, kh, bq * g, bq)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def causal_attention(
    q, k, v, positions, segment_ids, window, block: int, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """Causal grouped-query self-attention with packed segments, an optional sliding window, soft-cap
    and attention sinks.

    q: [B, T, N, H], k/v: [B, T, K, H], positions/segment_ids: [B, T] int32 (segment 0 = padding),
    window: int32 scalar (0 = none), block: static query and key block length (`attention_block_size`;
    min(block, T) is used), softcap: static float (0 = none), sinks: [N] logits or None. Returns
    [B, T, N, H] in q's dtype. Same result as the dense reference for every query that has a key to attend
    to (a key after its query in the row is never one); a query with none (padding) gets zeros. Memory is
    O(T * block).
    """
    return _attention_fwd(q, k, v, positions, segment_ids, window, block, softcap, sinks)[0]


def _attention_fwd(q, k, v, positions, segment_ids, window, block, softcap=0.0, sinks=None):
    """Online softmax: a scan over query blocks, for each a loop over its live key blocks."""
    window = jnp.asarray(window, jnp.int32)
    blk = _Blocks(q, k, positions, segment_ids, block)
    scale = 1.0 / math.sqrt(blk.h)
    qm, k_t, v_s = blk.heads(q), blk.heads(k, transposed=True), blk.heads(v)  # [nb, B, K, bm|H, H|bk]
    first, last = _span(_live_tiles(blk.pos, blk.seg, window))  # [nb]: the key blocks query block i sees

    def key_block(i, q_i, j, carry):
        m, total, acc = carry  # [B, K, bm, 1], [B, K, bm, 1], [B, K, bm, H] float32
        k_j, v_j = (jax.lax.dynamic_index_in_dim(x, j, keepdims=False) for x in (k_t, v_s))
        s = jnp.einsum("bkmh,bkhs->bkms", q_i, k_j, preferred_element_type=F32)  # [B, K, bm, bk]
        ok = blk.mask(i, j, window)
        s = jnp.where(ok, _capped(s * scale, softcap)[0], NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        fix = jnp.exp(m - m_new)
        pv = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v_j, preferred_element_type=F32)
        return m_new, total * fix + jnp.sum(p, axis=-1, keepdims=True), acc * fix + pv

    def query_block(_, xs):
        i, q_i, lo, hi = xs
        rows = (blk.b, blk.kh, q_i.shape[2])
        init = (
            jnp.full((*rows, 1), NEG_INF, F32),
            jnp.zeros((*rows, 1), F32),
            jnp.zeros((*rows, blk.h), F32),
        )
        if sinks is not None:  # the sink is the softmax's first entry: max = sink, sum = exp(0)
            sink = jnp.broadcast_to(blk.sink_rows(sinks)[None, :, :, None], (*rows, 1))
            init = (sink, jnp.ones((*rows, 1), F32), init[2])
        m, total, acc = jax.lax.fori_loop(lo, hi + 1, partial(key_block, i, q_i), init)
        total = jnp.maximum(total, TINY)
        return None, ((acc / total).astype(q.dtype), (m + jnp.log(total))[..., 0])

    _, (o, lse) = jax.lax.scan(query_block, None, (jnp.arange(blk.nb), qm, first, last))
    out = checkpoint_name(blk.unheads(o), RESIDUALS)  # [B, T, N, H]
    lse = checkpoint_name(lse, RESIDUALS)  # [nb, B, K, bm]
    return out, (q, k, v, positions, segment_ids, window, out, lse, sinks)


def _attention_bwd(block, softcap, res, d_out):
    """A scan over key blocks, for each a loop over the live query blocks that see it: dk and dv
    accumulate in the loop, dq [nb, B, K, H, bm] float32 in the scan's carry."""
    q, k, v, positions, segment_ids, window, out, lse, sinks = res  # lse: [nb, B, K, bm]
    blk = _Blocks(q, k, positions, segment_ids, block)
    scale = 1.0 / math.sqrt(blk.h)
    qm, q_t, dom, do_t = blk.heads(q), blk.heads(q, True), blk.heads(d_out), blk.heads(d_out, True)
    delta = blk.heads(jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True))[..., 0]
    first, last = _span(_live_tiles(blk.pos, blk.seg, window).T)  # [nb]: query blocks key block j meets
    at = lambda x, a: jax.lax.dynamic_index_in_dim(x, a, keepdims=False)  # noqa: E731

    def query_block(j, k_j, k_tj, v_j, i, carry):
        dq_t, dk, dv = carry
        s_t = jnp.einsum("bksh,bkhm->bksm", k_j, at(q_t, i), preferred_element_type=F32)  # [B, K, bk, bm]
        s_t, th = _capped(s_t * scale, softcap)
        ok = blk.mask(i, j, window, kv_major=True)
        p_t = jnp.where(ok, jnp.exp(s_t - at(lse, i)[:, :, None]), 0.0)
        dv = dv + jnp.einsum("bksm,bkmh->bksh", p_t.astype(v.dtype), at(dom, i), preferred_element_type=F32)
        dp_t = jnp.einsum("bksh,bkhm->bksm", v_j, at(do_t, i), preferred_element_type=F32)
        ds_t = p_t * (dp_t - at(delta, i)[:, :, None]) * scale
        if th is not None:  # d/ds of c * tanh(s / c)
            ds_t = ds_t * (1.0 - th * th)
        ds_t = ds_t.astype(q.dtype)
        dk = dk + jnp.einsum("bksm,bkmh->bksh", ds_t, at(qm, i), preferred_element_type=F32)
        dq_i = at(dq_t, i) + jnp.einsum("bkhs,bksm->bkhm", k_tj, ds_t, preferred_element_type=F32)
        return jax.lax.dynamic_update_index_in_dim(dq_t, dq_i, i, 0), dk, dv

    def key_block(dq_t, xs):
        j, k_j, k_tj, v_j, lo, hi = xs
        zeros = jnp.zeros(k_j.shape, F32)  # [B, K, bk, H]
        dq_t, dk, dv = jax.lax.fori_loop(
            lo, hi + 1, partial(query_block, j, k_j, k_tj, v_j), (dq_t, zeros, zeros)
        )
        return dq_t, (dk.astype(k.dtype), dv.astype(v.dtype))

    xs = (jnp.arange(blk.nb), blk.heads(k), blk.heads(k, True), blk.heads(v), first, last)
    dq_t, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q_t.shape, F32), xs)
    dq = blk.unheads(dq_t.astype(q.dtype).swapaxes(-1, -2))
    d_sinks = None
    if sinks is not None:  # d lse / d sink = p_sink; d loss / d sink = -sum over queries of p_sink * delta
        p_sink = jnp.exp(blk.sink_rows(sinks)[None, None] - lse)  # [nb, B, K, bm]
        per_row = -jnp.sum(p_sink * delta, axis=(0, 1)).reshape(blk.kh, blk.bq, blk.g)
        d_sinks = jnp.sum(per_row, axis=1).reshape(-1).astype(sinks.dtype)  # [N]
    return dq, blk.unheads(dk), blk.unheads(dv), None, None, None, d_sinks


causal_attention.defvjp(_attention_fwd, _attention_bwd)
