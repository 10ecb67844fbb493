"""The generation cache of a hybrid decoder (Qwen3.5): keys and values of its attention layers, the conv
inputs and recurrent state of its Gated DeltaNet layers.

    HybridCache(
      k, v: [L_full, B, S, K, H]          the attention layers' keys and values (compute dtype), as `KVCache`
      positions, segment_ids: [B, S]      of the cached keys (segment 0 = empty slot); index: the next slot
      conv: [L_lin, B, W - 1, C]          each DeltaNet layer's last W - 1 conv inputs (compute dtype)
      recurrent: [L_lin, B, Hv, Dk, Dv]   each DeltaNet layer's state of the gated delta rule (float32)
    )

The attention fields have `KVCache`'s names and meaning, so attention reads a layer's slice of either. A
DeltaNet layer's state does not grow: the prefill runs the chunked rule over the prompt (padding zeroed and
each row's state starting at its first real token, so a left-padded row ends in the state of the row run
alone) and every decode step one recurrent update (`jaxlora.models.deltanet.gated_deltanet`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.attention import KVCache
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.deltanet import DeltaNetState
from jaxlora.models.hybrid_weights import FULL_ATTN, LINEAR_ATTN


class HybridCache(NamedTuple):
    """See the module doc for the shapes."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    conv: jax.Array
    recurrent: jax.Array


def init_hybrid_cache(cfg: DecoderConfig, batch: int, max_len: int) -> HybridCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (zero states, index 0)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    full, lin = cfg.mixers.count(FULL_ATTN), cfg.mixers.count(LINEAR_ATTN)
    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
    kv = (full, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return HybridCache(
        k=jnp.zeros(kv, dt),
        v=jnp.zeros(kv, dt),
        positions=jnp.zeros((batch, max_len), jnp.int32),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        conv=jnp.zeros((lin, batch, cfg.linear_conv_kernel - 1, 2 * hk * dk + hv * dv), dt),
        recurrent=jnp.zeros((lin, batch, hv, dk, dv), jnp.float32),
    )


def mixer_stacks(cache: HybridCache) -> dict:
    """The per-layer parts by the params group of their mixer: {"attn": (k, v) [L_full, ...],
    "linear_attn": DeltaNetState [L_lin, ...]} (regrouped as the weights by `hybrid_layers`)."""
    return {"attn": (cache.k, cache.v), "linear_attn": DeltaNetState(cache.conv, cache.recurrent)}


def with_mixer_stacks(cache: HybridCache, stacks: dict) -> HybridCache:
    """`mixer_stacks`' inverse: the cache holding the updated stacks (a kind absent keeps its arrays)."""
    k, v = stacks.get("attn", (cache.k, cache.v))
    state = stacks.get("linear_attn", DeltaNetState(cache.conv, cache.recurrent))
    return cache._replace(k=k, v=v, conv=state.conv.astype(cache.conv.dtype), recurrent=state.recurrent)


def layer_cache(cache, kv):
    """One layer's view of the cache: kv is its (k, v) [B, S, K, H] (an attention layer) or its
    `DeltaNetState` (a DeltaNet layer: the `HybridCache` with that layer's conv and recurrent state)."""
    if isinstance(kv, DeltaNetState):
        return cache._replace(conv=kv.conv, recurrent=kv.recurrent)
    return cache._replace(k=kv[0], v=kv[1])


def layer_view(part, positions, segment_ids, index):
    """One layer's cache from its own part ((k, v) [B, S, K, H] or a `DeltaNetState`) and the shared slot
    positions and segment ids [B, S] and index: a `KVCache`, or a `HybridCache` without keys and values."""
    if isinstance(part, DeltaNetState):
        return HybridCache(None, None, positions, segment_ids, index, part.conv, part.recurrent)
    return KVCache(part[0], part[1], positions, segment_ids, index)


def repeat_states(cache, g: int):
    """Each row's DeltaNet states G times (rows b*G .. b*G+G-1), for a `HybridCache`; else the cache."""
    if not isinstance(cache, HybridCache):
        return cache
    conv, recurrent = jnp.repeat(cache.conv, g, axis=1), jnp.repeat(cache.recurrent, g, axis=1)
    return cache._replace(conv=conv, recurrent=recurrent)
