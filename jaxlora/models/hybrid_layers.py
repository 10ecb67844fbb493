"""Running a hybrid decoder (Qwen3.5): Gated DeltaNet and attention layers in one stack.

The weights every layer has are stacked on [L], each token mixer's on [L_kind] (`models.hybrid_weights`).
`run_hybrid` finds the smallest period P of the layer pattern (`cfg.mixers`; P = L when it has none),
regroups every per-layer array [L, ...] to [G, P, ...] and each mixer stack [L_kind, ...] to
[G, P_kind, ...] (G = L / P), and scans over the G groups; the scan's body unrolls the P layers of a group,
choosing each layer's mixer in Python. Without `runtime.scan_layers` it unrolls all L layers.
"""

from functools import partial

import jax

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.deltanet import DeltaNetDims, DeltaNetState, gated_deltanet
from jaxlora.models.hybrid_cache import mixer_stacks, with_mixer_stacks

# The params group of each kind's token mixer (under params["layers"] and in a LoRA tree).
MIXER_GROUPS = {"linear_attn": "linear_attention", "attn": "full_attention"}
_GROUPS = {kind: group for group, kind in MIXER_GROUPS.items()}


def deltanet_dims(cfg: DecoderConfig) -> DeltaNetDims:
    """The Gated DeltaNet layer's sizes, from the config."""
    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
    return DeltaNetDims(hk, hv, dk, dv, cfg.linear_conv_kernel, cfg.norm_eps)


def linear_attention(cfg: DecoderConfig, p: dict, proj, a: jax.Array, segment_ids: jax.Array, cache=None):
    """The Gated DeltaNet mixer on the normed stream a [B, T, D] (float32); `proj(group, name, inp)` runs a
    linear of the layer with its adapter; cache: this layer's `HybridCache` view (generation) or None.
    Returns ([B, T, D] in the compute dtype, the layer's new `DeltaNetState`, None without a cache)."""
    dt = jax.numpy.dtype(cfg.runtime.compute_dtype)
    state = None if cache is None else DeltaNetState(cache.conv, cache.recurrent)
    out, new = gated_deltanet(
        p["linear_attn"], a.astype(dt), deltanet_dims(cfg), partial(proj, "linear_attn"), segment_ids, state
    )
    return out, (None if cache is None else new)


def period(mixers: tuple[str, ...]) -> int:
    """The smallest P with mixers[i] == mixers[i % P] for every layer and L % P == 0."""
    n = len(mixers)
    return next(
        p for p in range(1, n + 1) if n % p == 0 and all(mixers[i] == mixers[i % p] for i in range(n))
    )


def _regroup(tree, groups: int, kinds: tuple[str, ...]):
    """A layer tree {group: ...}: shared leaves [L, ...] -> [G, P, ...], mixer leaves [L_kind, ...] ->
    [G, P_kind, ...]."""
    if tree is None:
        return None
    out = {}
    for key, sub in tree.items():
        rows = kinds.count(MIXER_GROUPS[key]) if key in MIXER_GROUPS else len(kinds)
        out[key] = jax.tree.map(lambda a, rows=rows: a.reshape(groups, rows, *a.shape[1:]), sub)
    return out


def _layer(tree, j: int, kinds: tuple[str, ...]):
    """Layer j of a group: its row of the shared leaves [P, ...], and of its own mixer's [P_kind, ...]."""
    if tree is None:
        return None
    kind, out = kinds[j], {}
    row = kinds[:j].count(kind)
    for key, sub in tree.items():
        if key not in MIXER_GROUPS:
            out[key] = jax.tree.map(lambda a: a[j], sub)
        elif MIXER_GROUPS[key] == kind:
            out[key] = jax.tree.map(lambda a: a[row], sub)
    return out


def layer_slices(tree, mixers: tuple[str, ...]) -> list:
    """A layer tree (weights, adapters, or `hybrid_cache.mixer_stacks`) as one tree per layer: layer i's row
    of the shared leaves and of its own mixer's (None -> None per layer)."""
    return [_layer(tree, i, mixers) for i in range(len(mixers))]


def run_hybrid(cfg: DecoderConfig, one_layer, h: jax.Array, per_layer: tuple, cache=None):
    """Every layer on h [B, T, D]: `one_layer(h, (weights, adapters, inv_freq, window, scale, rng, kv))` of
    `decoder.run_layers`, over groups of one period of the pattern; kv is the layer's part of `cache` (a
    `HybridCache`: (k, v) of an attention layer, a DeltaNet layer's `DeltaNetState`) or None.
    Returns (h, (the updated cache or None, the router statistics [L, 2, E] of a MoE model, in layer
    order, or None))."""
    params, lora, *rest = per_layer
    size = period(cfg.mixers) if cfg.runtime.scan_layers else cfg.num_layers
    groups, kinds = cfg.num_layers // size, cfg.mixers[:size]
    stacks = None if cache is None else mixer_stacks(cache)
    xs = (
        _regroup(params, groups, kinds),
        _regroup(lora, groups, kinds),
        *(jax.tree.map(lambda a: a.reshape(groups, size, *a.shape[1:]), r) for r in rest[:-1]),
        _regroup(stacks, groups, kinds),
    )

    def body(h, xs):  # one group: P layers, unrolled; -> (h, (new cache rows, stats [P, 2, E]) or Nones)
        params, lora, *rest, kv = xs
        new, stats = {}, []
        for j in range(size):
            x = (
                _layer(params, j, kinds),
                _layer(lora, j, kinds),
                *(jax.tree.map(lambda a, j=j: a[j], r) for r in rest),
                None if kv is None else next(iter(_layer(kv, j, kinds).values())),
            )
            h, (layer_kv, st) = one_layer(h, x)
            new.setdefault(_GROUPS[kinds[j]], []).append(layer_kv)
            stats.append(st)
        stats = jax.numpy.stack(stats) if cfg.num_experts else None
        if kv is None:
            return h, (None, stats)
        rows = {group: jax.tree.map(lambda *a: jax.numpy.stack(a), *v) for group, v in new.items()}
        return h, (rows, stats)

    if cfg.runtime.scan_layers:
        h, (new, stats) = jax.lax.scan(body, h, xs)  # stats [G, P, 2, E]
    else:
        h, (new, stats) = body(h, jax.tree.map(lambda a: a[0], xs))  # stats [L, 2, E]
        new = None if new is None else jax.tree.map(lambda a: a[None], new)
    stats = None if stats is None else stats.reshape(cfg.num_layers, *stats.shape[-2:])
    if cache is None:
        return h, (None, stats)
    new = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new)  # [G, P_kind, ...] -> [L_kind, ...]
    return h, (with_mixer_stacks(cache, new), stats)
