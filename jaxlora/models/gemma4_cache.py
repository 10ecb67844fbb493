"""The generation cache of Gemma 4's text decoder: the keys and values of the layers with their own k/v,
stacked by layer type (a full layer's head dim and kv heads differ from a sliding one's).

    Gemma4Cache(
      k, v: [L_sliding_own, B, S, K, H]   the sliding layers' keys and values (compute dtype)
      positions, segment_ids: [B, S]      of the cached keys (segment 0 = empty slot); index: the next slot
      global_k, global_v: [L_full_own, B, S, Kg, Hg]   the full layers' (`global_head_dim`, `global_kv_heads`)
    )

The fields `k`, `v`, `positions`, `segment_ids` and `index` have `KVCache`'s names and meaning. A KV-shared
layer has no entry: it attends with its source layer's (`gemma4_spec.kv_source`) keys and values, this
step's already written, as transformers does. Every slot is kept; a sliding layer masks the keys outside
its window by position (`attention.attention_mask`), as the Gemma 2/3 cache does.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.attention import KVCache
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.gemma4_spec import layer_type, own_kv
from jaxlora.models.layer_settings import FULL, SLIDING


class Gemma4Cache(NamedTuple):
    """See the module doc for the shapes."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    global_k: jax.Array
    global_v: jax.Array


def own_rows(cfg: DecoderConfig) -> dict[int, tuple[str, int]]:
    """{layer with its own k/v: (its type, its row in that type's stack)}."""
    out, seen = {}, {SLIDING: 0, FULL: 0}
    for i, kind in enumerate(cfg.mixers):
        if own_kv(kind):
            t = layer_type(kind)
            out[i], seen[t] = (t, seen[t]), seen[t] + 1
    return out


def init_gemma4_cache(cfg: DecoderConfig, batch: int, max_len: int) -> Gemma4Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens (index 0)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    types = [t for t, _ in own_rows(cfg).values()]
    sliding = (types.count(SLIDING), batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    full = (types.count(FULL), batch, max_len, cfg.global_kv_heads, cfg.global_head_dim)
    return Gemma4Cache(
        k=jnp.zeros(sliding, dt),
        v=jnp.zeros(sliding, dt),
        positions=jnp.zeros((batch, max_len), jnp.int32),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        global_k=jnp.zeros(full, dt),
        global_v=jnp.zeros(full, dt),
    )


def type_stacks(cache: Gemma4Cache) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer type: (k, v) [L_type_own, B, S, K, H]}."""
    return {SLIDING: (cache.k, cache.v), FULL: (cache.global_k, cache.global_v)}


def with_type_stacks(cache: Gemma4Cache, stacks: dict) -> Gemma4Cache:
    """`type_stacks`' inverse: the cache holding the updated stacks (a type absent keeps its arrays)."""
    k, v = stacks.get(SLIDING, (cache.k, cache.v))
    gk, gv = stacks.get(FULL, (cache.global_k, cache.global_v))
    return cache._replace(k=k, v=v, global_k=gk, global_v=gv)


def layer_view(cache: Gemma4Cache, kv: tuple[jax.Array, jax.Array]) -> KVCache:
    """One layer's `KVCache`: its (k, v) [B, S, K, H] (a KV-shared layer: its source's) and the cache's
    positions, segment ids and index."""
    return KVCache(kv[0], kv[1], cache.positions, cache.segment_ids, cache.index)


def repeat_global(cache, grow):
    """A `Gemma4Cache` with `grow` ([L, P, S, ...] -> [L, P*G, S + extra, ...]) applied to the full layers'
    keys and values too (`rollout.repeat_cache` grows the rest); any other cache as it is."""
    if not isinstance(cache, Gemma4Cache):
        return cache
    return cache._replace(global_k=grow(cache.global_k), global_v=grow(cache.global_v))
