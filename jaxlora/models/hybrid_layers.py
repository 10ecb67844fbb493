"""Running a hybrid decoder (Qwen3.5): Gated DeltaNet and attention layers in one stack.

The weights every layer has are stacked on [L], each token mixer's on [L_kind] (`models.hybrid_weights`).
`run_hybrid` finds the smallest period P of the layer pattern (`cfg.mixers`; P = L when it has none),
regroups every per-layer array [L, ...] to [G, P, ...] and each mixer stack [L_kind, ...] to
[G, P_kind, ...] (G = L / P), and scans over the G groups; the scan's body unrolls the P layers of a group,
choosing each layer's mixer in Python. Without `runtime.scan_layers` it unrolls all L layers.
"""

from functools import partial

import jax

from jaxlora.errors import UserError
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.deltanet import DeltaNetDims, gated_deltanet

# The params group of each kind's token mixer (under params["layers"] and in a LoRA tree).
MIXER_GROUPS = {"linear_attn": "linear_attention", "attn": "full_attention"}


def deltanet_dims(cfg: DecoderConfig) -> DeltaNetDims:
    """The Gated DeltaNet layer's sizes, from the config."""
    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
    return DeltaNetDims(hk, hv, dk, dv, cfg.linear_conv_kernel, cfg.norm_eps)


def linear_attention(cfg: DecoderConfig, p: dict, proj, a: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The Gated DeltaNet mixer on the normed stream a [B, T, D] (float32); `proj(group, name, inp)` runs a
    linear of the layer with its adapter. Returns [B, T, D] in the compute dtype."""
    dt = jax.numpy.dtype(cfg.runtime.compute_dtype)
    out, _ = gated_deltanet(
        p["linear_attn"], a.astype(dt), deltanet_dims(cfg), partial(proj, "linear_attn"), segment_ids
    )
    return out


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


def run_hybrid(cfg: DecoderConfig, one_layer, h: jax.Array, per_layer: tuple):
    """Every layer on h [B, T, D]: `one_layer(h, (weights, adapters, inv_freq, window, scale, rng, kv))` of
    `decoder.run_layers`, over groups of one period of the pattern. Returns (h, (None, the router statistics
    [L, 2, E] of a MoE model, in layer order, or None))."""
    params, lora, *rest = per_layer
    if rest[-1] is not None:
        raise UserError(
            f"generation with a KV cache is not supported for {cfg.model_type} (hybrid layers) yet"
        )
    size = period(cfg.mixers) if cfg.runtime.scan_layers else cfg.num_layers
    groups, kinds = cfg.num_layers // size, cfg.mixers[:size]
    xs = (
        _regroup(params, groups, kinds),
        _regroup(lora, groups, kinds),
        *(jax.tree.map(lambda a: a.reshape(groups, size, *a.shape[1:]), r) for r in rest),
    )

    def body(h, xs):  # one group: P layers, unrolled; -> (h, router statistics [P, 2, E] or None)
        params, lora, *rest = xs
        stats = []
        for j in range(size):
            x = (
                _layer(params, j, kinds),
                _layer(lora, j, kinds),
                *(jax.tree.map(lambda a, j=j: a[j], r) for r in rest),
            )
            h, (_, st) = one_layer(h, x)
            stats.append(st)
        return h, (jax.numpy.stack(stats) if cfg.num_experts else None)

    if cfg.runtime.scan_layers:
        h, stats = jax.lax.scan(body, h, xs)  # [G, P, 2, E]
    else:
        h, stats = body(h, jax.tree.map(lambda a: a[0], xs))  # [L, 2, E]
    return h, (None, None if stats is None else stats.reshape(cfg.num_layers, *stats.shape[-2:]))
