"""Grouped-query self-attention: the dense reference, the blocked XLA kernel, cuDNN's and Pallas's.

`attend` is what the decoder calls. With a KV cache (generation) it writes this step's keys and values
and runs the dense reference over the cache. Without one (training, prefill) it runs the implementation
`model.attention` names, `auto` resolved per case at trace time (`choose.choose_attention`):

    reference   `reference_attention`: dense XLA, float32 softmax; the ground truth every other is tested on
    xla         `blocked.causal_attention`: causal blocks with a flash-style backward pass (CPU default)
    cudnn       `gpu.cudnn_attention`: cuDNN flash attention through `jax.nn.dot_product_attention`;
                unpacked right-padded rows, one static sliding window, no soft-capping, no sinks
    pallas      `gpu.pallas_attention`: jaxlora's Pallas (Triton) flash attention (`flash`), forward and
                backward: segment ids (packing), GQA, per-layer windows, soft-capping and attention sinks;
                runs on the CPU in interpret mode for the tests

All take (q, k, v, positions, segment_ids, window, softcap) and mean the same thing: causal, GQA, packed
segments (segment ids with positions restarting at 0; segment 0 = padding, never attended to), a sliding
window (int32 scalar, 0 = none: a query sees keys with 0 <= delta < window) and logit soft-capping
`c * tanh(s / c)` of the scaled scores (Gemma 2; 0 = none). Attention sinks (gpt-oss; None = none) are a
float32 logit per query head [N] that joins each query's softmax denominator and adds no value. Padding
queries' outputs are unspecified (zeros except in the reference); nothing reads them.

Candidates not built yet: cuDNN's packed layout (`q_offsets`/`kv_offsets`, Hopper, a private JAX API),
which would run packed rows through cuDNN; and splitting a packed batch by segment into unpacked rows.

Shapes: B batch, T queries, S keys, N query heads, K key/value heads (G = N / K queries per key head),
H head dim. The training kernels name the tensors their backward pass keeps `attention_residuals`, so the
decoder's `lean` remat policy can keep them instead of running the attention forward again.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.attention.blocked import RESIDUALS, attention_block_size, causal_attention
from jaxlora.models.attention.choose import choose_attention, static_window
from jaxlora.models.attention.gpu import cudnn_attention, pallas_attention, with_named_residuals
from jaxlora.models.config import DecoderConfig

__all__ = [
    "RESIDUALS",
    "KVCache",
    "attend",
    "attention_block_size",
    "attention_mask",
    "causal_attention",
    "choose_attention",
    "cudnn_attention",
    "dot_attention",
    "pallas_attention",
    "reference_attention",
    "with_named_residuals",
]

F32 = jnp.float32
NEG_INF = float(jnp.finfo(jnp.float32).min)


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
    sinks: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Self-attention of one layer: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    positions, segment_ids: [B, T] int32 of the queries; window: int32 scalar (0 = no sliding window);
    sinks: [N] sink logits or None. With `cache` (this layer's slice) returns the cache's updated (k, v)
    too, else None.
    """
    softcap = cfg.attn_logit_softcap
    if sinks is not None:
        sinks = sinks.astype(F32)
    if cache is not None:
        dt = jnp.dtype(cfg.runtime.compute_dtype)
        ck = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache.index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache.index, 0, 0))
        mask = attention_mask(positions, segment_ids, cache.positions, cache.segment_ids, window)
        return dot_attention(q, ck.astype(dt), cv.astype(dt), mask, softcap=softcap, sinks=sinks), (ck, cv)
    t = q.shape[1]
    impl = choose_attention(cfg, q.dtype, t)
    if impl == "cudnn":  # cuDNN's window is static: the one all layers share (checked by choose)
        return cudnn_attention(q, k, v, positions, segment_ids, static_window(cfg, t)), None
    if impl == "pallas":
        return pallas_attention(q, k, v, positions, segment_ids, window, softcap, sinks=sinks), None
    if impl == "reference":
        return reference_attention(q, k, v, positions, segment_ids, window, softcap, sinks), None
    block = attention_block_size(t)
    return causal_attention(q, k, v, positions, segment_ids, window, block, softcap, sinks), None


# --- the reference ------------------------------------------------------------------------------------------


def attention_mask(q_pos, q_seg, kv_pos, kv_seg, window) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment, key not padding, causal by position, inside the window.

    q_pos, q_seg: [B, T]; kv_pos, kv_seg: [B, S]; `window` is a traced int, 0 means no sliding window.
    """
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)  # [B, T, S]
    delta = q_pos[:, :, None] - kv_pos[:, None, :]
    causal = delta >= 0
    in_window = (window == 0) | (delta < window)
    return (same & causal & in_window)[:, None]


def dot_attention(
    q, k, v, mask, cfg: DecoderConfig | None = None, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """Dense grouped-query attention with a float32 softmax (the KV-cache path and the reference).

    q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, 1, T, S] -> [B, T, N, H]. softcap: 0 = none, else
    the scaled scores become softcap * tanh(scores / softcap); `cfg`, if given, supplies it when 0.
    sinks: [N] logits or None: one more softmax entry per query head whose probability is dropped.
    """
    softcap = softcap or (cfg.attn_logit_softcap if cfg is not None else 0.0)
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=F32) / math.sqrt(h)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # [B, K, G, T, S]
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:  # the sink is one more column of the softmax, then dropped
        sink = jnp.broadcast_to(sinks.astype(F32).reshape(1, kh, n // kh, 1, 1), (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


def reference_attention(
    q, k, v, positions, segment_ids, window, softcap: float = 0.0, sinks=None
) -> jax.Array:
    """The ground truth: `dot_attention` under the dense `attention_mask`, differentiated by autodiff.

    q: [B, T, N, H], k/v: [B, T, K, H], positions/segment_ids: [B, T], window: int32 scalar, sinks: [N]
    or None -> [B, T, N, H].
    """
    mask = attention_mask(positions, segment_ids, positions, segment_ids, window)
    return dot_attention(q, k, v, mask, softcap=softcap, sinks=sinks)
