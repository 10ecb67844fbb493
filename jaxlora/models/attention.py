"""Grouped-query attention: the XLA reference, the blocked kernel used for training, and cuDNN's.

`attend` is what the decoder calls; it picks the implementation:

    with a KV cache (generation)        write this step's keys and values, then `dot_attention` over the cache
    no cache, model.attention=xla       `causal_attention`: causal blocks with a flash-style backward pass
    no cache, model.attention=cudnn     `cudnn_attention`: cuDNN flash attention (GPU, bfloat16/float16)

Shapes: B batch, T queries, S keys, N query heads, K key/value heads (G = N / K queries per key head),
H head dim. Segment id 0 marks padding; packed rows use 1, 2, ... and never attend across segments.

The training kernels name the tensors their backward pass keeps `attention_residuals`, so the decoder's
`lean` remat policy can keep them instead of running the attention forward again.
"""

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig

F32 = jnp.float32
NEG_INF = float(jnp.finfo(jnp.float32).min)
TINY = float(jnp.finfo(jnp.float32).tiny)
RESIDUALS = "attention_residuals"  # checkpoint name of what the attention backward pass reads


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, for generation (`jaxlora.models.generate.init_cache`).

    k, v: [L, B, S, K, H] in the compute dtype (one layer sees its slice [B, S, K, H]);
    positions, segment_ids: [B, S] int32 of the cached keys (segment 0 = empty slot);
    index: int32 scalar, the slot the next keys go to.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: DecoderConfig,
    positions: jax.Array,
    segment_ids: jax.Array,
    window: jax.Array,
    cache: KVCache | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Self-attention of one layer: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    positions, segment_ids: [B, T] int32 of the queries; window: int32 scalar (0 = no sliding window).
    With `cache` (this layer's slice) returns the cache's updated (k, v) too, else None.
    """
    if cache is not None:
        dt = jnp.dtype(cfg.compute_dtype)
        ck = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache.index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache.index, 0, 0))
        mask = attention_mask(positions, segment_ids, cache.positions, cache.segment_ids, window)
        return dot_attention(q, ck.astype(dt), cv.astype(dt), mask, cfg), (ck, cv)
    if cfg.attention == "cudnn":
        mask = attention_mask(positions, segment_ids, positions, segment_ids, window)
        return cudnn_attention(q, k, v, mask), None
    block = attention_block_size(q.shape[1])
    return causal_attention(q, k, v, positions, segment_ids, window, block), None


# --- the XLA reference ------------------------------------------------------------------------------------


def attention_mask(q_pos, q_seg, kv_pos, kv_seg, window) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment, key not padding, causal by position, inside the window.

    q_pos, q_seg: [B, T]; kv_pos, kv_seg: [B, S]; `window` is a traced int, 0 means no sliding window.
    """
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)  # [B, T, S]
    delta = q_pos[:, :, None] - kv_pos[:, None, :]
    causal = delta >= 0
    in_window = (window == 0) | (delta < window)
    return (same & causal & in_window)[:, None]


def dot_attention(q, k, v, mask, cfg: DecoderConfig) -> jax.Array:
    """Dense grouped-query attention (the KV-cache path and the reference for `causal_attention`).

    q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, 1, T, S] -> [B, T, N, H].
    """
    b, t, n, h = q.shape
    g = n // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, g, h)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=F32) / math.sqrt(h)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


# --- causal attention in blocks, for training and prefill (no cache) --------------------------------------
#
# Hand-written rather than `dot_attention` under autodiff or `jax.nn.dot_product_attention(implementation=
# "xla")`, for two reasons measured on XLA:CPU (where there is no fused attention kernel):
# - Memory: autodiff keeps three float32 [B, N, T, S] tensors per layer (scores, probabilities, mask) as
#   residuals. The custom VJP keeps only q, k, v, the output and the log-sum-exp per query (FlashAttention's
#   residuals) and recomputes the probabilities block by block in the backward pass.
# - Work: query block i attends to keys 0 .. end of block i only (keys after a query are never attended
#   to), so about half of the [T, S] score matrix is never computed. Every matmul is laid out as
#   [batch, M, contract] x [batch, contract, N] with one contracting dimension (query rows m = (t, g)
#   flattened), which XLA:CPU runs without transposing the large operand.


def attention_block_size(t: int) -> int:
    """Query/key block length for `causal_attention`: 64, or T/16 rounded up to 64 for long sequences."""
    return max(64, -(-t // 16 // 64) * 64)


def _allowed(q_pos, q_seg, q_idx, k_pos, k_seg, k_idx, window) -> jax.Array:
    """Broadcastable bool: same non-padding segment, causal by position and by index, inside the window."""
    delta = q_pos - k_pos
    return (
        (q_seg == k_seg) & (k_seg != 0) & (delta >= 0) & ((window == 0) | (delta < window)) & (k_idx <= q_idx)
    )


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, t)) for i in range(0, t, block)]


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def causal_attention(q, k, v, positions, segment_ids, window, block: int) -> jax.Array:
    """Causal grouped-query self-attention with packed segments and an optional sliding window.

    q: [B, T, N, H], k/v: [B, T, K, H], positions/segment_ids: [B, T] int32 (segment 0 = padding),
    window: int32 scalar (0 = none), block: static block length. Returns [B, T, N, H] in q's dtype.
    Same result as `dot_attention` with `attention_mask` for every query that has a key to attend to
    (a key after its query in the row is never one); a query with none (padding) gets zeros.
    """
    return _attention_fwd(q, k, v, positions, segment_ids, window, block)[0]


def _attention_fwd(q, k, v, positions, segment_ids, window, block):
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h)
    qm = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)  # [B, K, M, H]
    k_t = k.transpose(0, 2, 3, 1)  # [B, K, H, S]
    v_s = v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    pos, seg, idx = positions, segment_ids, jnp.arange(t)
    outs, lses = [], []
    for q0, q1 in _spans(t, block):
        s = jnp.einsum(
            "bkmh,bkhs->bkms", qm[:, :, q0 * g : q1 * g], k_t[..., :q1], preferred_element_type=F32
        )
        ok = _allowed(
            pos[:, q0:q1, None],
            seg[:, q0:q1, None],
            idx[q0:q1, None],
            pos[:, None, :q1],
            seg[:, None, :q1],
            idx[None, :q1],
            window,
        )  # [B, bq, S]
        ok = jnp.broadcast_to(ok[:, None, :, None], (b, kh, q1 - q0, g, q1)).reshape(s.shape)
        s = jnp.where(ok, s * scale, NEG_INF)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(ok, jnp.exp(s - m), 0.0)
        total = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), TINY)
        o = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v_s[:, :, :q1], preferred_element_type=F32)
        outs.append(o / total)
        lses.append((m + jnp.log(total))[..., 0])
    o = jnp.concatenate(outs, axis=2).astype(q.dtype)  # [B, K, M, H]
    out = checkpoint_name(o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h), RESIDUALS)
    lse = checkpoint_name(jnp.concatenate(lses, axis=2), RESIDUALS)  # [B, K, M]
    return out, (q, k, v, positions, segment_ids, window, out, lse)


def _attention_bwd(block, res, d_out):
    q, k, v, positions, segment_ids, window, out, lse = res  # lse: [B, K, M]
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    m = t * g
    scale = 1.0 / math.sqrt(h)
    q5, do5 = q.reshape(b, t, kh, g, h), d_out.reshape(b, t, kh, g, h)
    qm, dom = (x.transpose(0, 2, 1, 3, 4).reshape(b, kh, m, h) for x in (q5, do5))  # [B, K, M, H]
    q_t, do_t = (x.transpose(0, 2, 4, 1, 3).reshape(b, kh, h, m) for x in (q5, do5))  # [B, K, H, M]
    k_s, v_s = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    k_t = k.transpose(0, 2, 3, 1)  # [B, K, H, S]
    o5 = out.reshape(b, t, kh, g, h).astype(F32)
    delta = jnp.sum(do5.astype(F32) * o5, axis=-1).transpose(0, 2, 1, 3).reshape(b, kh, m)  # [B, K, M]
    pos, seg, idx = positions, segment_ids, jnp.arange(t)
    dks, dvs, dq_t = [], [], jnp.zeros((b, kh, h, m), F32)
    # Key block j meets the queries from its own start on; everything is computed transposed, [S, M].
    for k0, k1 in _spans(t, block):
        rows = slice(k0 * g, m)
        s_t = jnp.einsum("bksh,bkhm->bksm", k_s[:, :, k0:k1], q_t[..., rows], preferred_element_type=F32)
        ok = _allowed(
            pos[:, None, k0:],
            seg[:, None, k0:],
            idx[None, k0:],
            pos[:, k0:k1, None],
            seg[:, k0:k1, None],
            idx[k0:k1, None],
            window,
        )  # [B, bk, T - k0]
        ok = jnp.broadcast_to(ok[:, None, :, :, None], (b, kh, k1 - k0, t - k0, g)).reshape(s_t.shape)
        p_t = jnp.where(ok, jnp.exp(s_t * scale - lse[:, :, None, rows]), 0.0)
        dvs.append(
            jnp.einsum("bksm,bkmh->bksh", p_t.astype(v.dtype), dom[:, :, rows], preferred_element_type=F32)
        )
        dp_t = jnp.einsum("bksh,bkhm->bksm", v_s[:, :, k0:k1], do_t[..., rows], preferred_element_type=F32)
        ds_t = (p_t * (dp_t - delta[:, :, None, rows]) * scale).astype(q.dtype)
        dks.append(jnp.einsum("bksm,bkmh->bksh", ds_t, qm[:, :, rows], preferred_element_type=F32))
        dq_blk = jnp.einsum("bkhs,bksm->bkhm", k_t[..., k0:k1], ds_t, preferred_element_type=F32)
        dq_t = dq_t.at[..., rows].add(dq_blk)
    dq = dq_t.astype(q.dtype).reshape(b, kh, h, t, g).transpose(0, 3, 1, 4, 2).reshape(b, t, n, h)
    dk = jnp.concatenate(dks, axis=2).astype(k.dtype).transpose(0, 2, 1, 3)
    dv = jnp.concatenate(dvs, axis=2).astype(v.dtype).transpose(0, 2, 1, 3)
    return dq, dk, dv, None, None, None


causal_attention.defvjp(_attention_fwd, _attention_bwd)


# --- the GPU path -------------------------------------------------------------------------------------------


def cudnn_attention(q, k, v, mask) -> jax.Array:
    """cuDNN flash attention (causal, GQA; packed segments and sliding windows through `mask`).

    q: [B, T, N, H], k/v: [B, T, K, H], mask: [B, 1, T, T] -> [B, T, N, H]. Needs a GPU and
    bfloat16/float16 inputs; raises UserError otherwise (there is no silent fallback, so a run or a
    benchmark never reports XLA attention as cuDNN).
    """
    if jax.default_backend() != "gpu":
        raise UserError(
            f"model.attention=cudnn needs an NVIDIA GPU (cuDNN flash attention) but JAX runs on "
            f"{jax.default_backend()!r} here; use model.attention=xla"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"model.attention=cudnn needs model.compute_dtype bfloat16 or float16, got {q.dtype}; "
            "set model.compute_dtype=bfloat16 or use model.attention=xla"
        )
    return _cudnn_named(q, k, v, mask)


def with_named_residuals(fn):
    """`fn(q, k, v, mask)` with the same values and gradients, its backward-pass residuals named RESIDUALS.

    Library kernels (cuDNN's) do not name their residuals, so a `save_only_these_names` policy would run
    them again in the backward pass; this wrapper lets the `lean` policy keep them as it keeps ours.
    """

    @jax.custom_vjp
    def wrapped(q, k, v, mask):
        return fn(q, k, v, mask)

    def fwd(q, k, v, mask):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        named = partial(checkpoint_name, name=RESIDUALS)
        return named(out), jax.tree.map(named, pullback)

    def bwd(pullback, d_out):
        return (*pullback(d_out), None)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _cudnn_call(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


_cudnn_named = with_named_residuals(_cudnn_call)
