"""Running Gemma 4's text decoder (`gemma4_text`): its attention, per-layer input embeddings, KV sharing.

The weights are declared in `jaxlora.models.gemma4_spec`: each layer type's attention weights are stacked
apart (a full layer's head dim and kv heads differ), and the KV-shared layers have no k/v weights.
`run_gemma4` runs the layers with their own k/v, then the KV-shared ones, each as a scan over groups of one
period of their kinds (the stacks cut and regrouped [G, P_kind, ...]; the group's layers unrolled in the
scan's body): layer i reads its row of every stack it is in, the decoder's `block` runs on a config whose
head dim and kv heads are its type's, and a KV-shared layer attends with the keys and values of its source
layer (`gemma4_spec.kv_source`), kept from the first scan. In generation the first scan also carries the
cache's rows of its layers (`gemma4_cache`: stacked by layer type) and writes this step's keys and values
into them; a KV-shared layer then attends with its source's updated row.

Per-layer input embeddings (PLE, width P): before the layers, `per_layer_inputs` mixes a token's row of the
packed table [Vp, L*P] (times sqrt(P)) with a projection of its embedding (times D^-1/2, RMS-normed per
layer), (both) / sqrt(2) -> [B, T, L, P]; after each layer's MLP, `ple_residual` adds
norm(per_layer_projection(act(per_layer_input_gate(h)) * ple_i)). The layer's output is then times its
`layer_scalar`.
"""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.attention import attend, attention_mask, dot_attention
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.gemma4_cache import layer_view, own_rows, type_stacks, with_type_stacks
from jaxlora.models.gemma4_spec import kv_source, layer_type, own_kv
from jaxlora.models.hybrid_layers import period
from jaxlora.models.layer_ops import linear, norm
from jaxlora.models.layer_settings import FULL, SLIDING
from jaxlora.models.lora_product import lora_product_for
from jaxlora.models.moe import moe_mlp
from jaxlora.models.spec import layer_ids, name_table

F32 = jnp.float32


def kind_config(cfg: DecoderConfig, kind: str) -> DecoderConfig:
    """The config a layer of this type runs with: a full layer's head dim and kv heads."""
    if layer_type(kind) == FULL:
        return dataclasses.replace(cfg, head_dim=cfg.global_head_dim, num_kv_heads=cfg.global_kv_heads)
    return cfg


def inv_freqs(cfg: DecoderConfig) -> dict[str, jax.Array]:
    """RoPE inverse frequencies [H/2] per layer type: default RoPE (base `rope_local_theta`) on the sliding
    layers; on the full ones `rope_dim` rotated dims (proportional RoPE: base^(-2j / Hg), the rest 0)."""
    h, hg, r = cfg.head_dim, cfg.global_head_dim, cfg.rope_dim
    local = 1.0 / (cfg.rope_local_theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
    rotated = 1.0 / (cfg.rope_theta ** (jnp.arange(0, r, 2, dtype=F32) / hg))
    full = jnp.concatenate([rotated, jnp.zeros((hg - r) // 2, F32)]) / cfg.rope_factor
    return {SLIDING: local, FULL: full}


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF's half-split RoPE over the whole head. x: [B, T, N, H], inv_freq: [H/2] -> [B, T, N, H]."""
    angles = positions[..., None].astype(F32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    xf, half = x.astype(F32), x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _rms(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a scale (the values' norm), in float32."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def gemma4_attention(cfg: DecoderConfig, p: dict, proj, a: jax.Array, x):
    """Gemma 4's attention on the normed stream a [B, T, D]; `cfg` is the layer type's (`kind_config`),
    `proj(group, name, inp)` runs a linear of the layer with its adapter, `x` its `LayerInputs`.

    q -> q_norm -> RoPE; k -> k_norm -> RoPE, v (or k's projection, `k_eq_v`) -> RMS norm without scale;
    a KV-shared layer takes (k, v) from `x.shared_kv`. Scores unscaled. Returns ([B, T, D], (k, v)
    [B, T, K, H] each: what a KV-shared layer reading this one attends with). With `x.cache` (generation:
    a `KVCache` view, a KV-shared layer's holding its source's keys) (k, v) is the layer's cache [B, S, K, H]
    with this step's written (a KV-shared layer's: its source's, unchanged)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    group = "global_attn" if "global_attn" in p else "attn"
    g, (b, t, _) = p[group], a.shape
    q = proj(group, "q_proj", a).reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
    q = _rope(norm(g["q_norm"], q, cfg).astype(dt), x.positions, x.inv_freq)
    if x.shared_kv is not None:
        k, v = x.shared_kv
    else:
        k = proj(group, "k_proj", a).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
        v = proj(group, "v_proj", a).reshape(k.shape) if "v_proj" in g else k
        k = _rope(norm(g["k_norm"], k, cfg).astype(dt), x.positions, x.inv_freq)
        v = _rms(v, cfg.norm_eps).astype(dt)
    # every kernel divides the scores by sqrt(H); Gemma 4 does not scale them
    q = (q.astype(F32) * math.sqrt(cfg.head_dim)).astype(dt)
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
    if x.cache is not None and x.shared_kv is not None:  # the source's cache, this step's keys in it
        c = x.cache
        mask = attention_mask(x.positions, x.segment_ids, c.positions, c.segment_ids, x.window)
        out = dot_attention(q, k.astype(dt), v.astype(dt), mask, cfg)  # [B, T, N, H]
    else:
        out, new = attend(q, k, v, cfg, x.positions, x.segment_ids, x.window, x.cache)  # [B, T, N, H]
        k, v = (k, v) if new is None else new
    return proj(group, "o_proj", out.reshape(b, t, cfg.q_dim)), (k, v)


def per_layer_inputs(params: dict, cfg: DecoderConfig, input_ids: jax.Array, h: jax.Array) -> jax.Array:
    """PLE: the per-layer inputs [B, T, L, P] (float32) of the tokens `input_ids` [B, T] whose scaled
    embeddings are h [B, T, D]."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    b, t = input_ids.shape
    shape = (b, t, cfg.num_layers, cfg.ple_dim)
    tok = jnp.take(params["ple"]["embedding"], input_ids, axis=0).astype(dt)  # [B, T, L*P]
    tok = (tok * jnp.asarray(math.sqrt(cfg.ple_dim), dt)).astype(F32).reshape(shape)
    ctx = linear(params["ple"]["projection"], h.astype(dt), dt).astype(F32) * cfg.hidden_size**-0.5
    ctx = norm(params["ple"]["norm"], ctx.reshape(shape), cfg)  # [B, T, L, P]
    return (ctx + tok) * 2.0**-0.5


def ple_residual(cfg: DecoderConfig, p: dict, proj, h: jax.Array, ple: jax.Array) -> jax.Array:
    """What layer i's PLE adds to the stream h [B, T, D] (float32), given its input ple [B, T, P]."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    gate = proj("ple", "per_layer_input_gate", h.astype(dt)).astype(F32)  # [B, T, P]
    act = jax.nn.gelu(gate, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(gate)
    out = proj("ple", "per_layer_projection", (act * ple).astype(dt))  # [B, T, D]
    return norm(p["ple"]["post_norm"], out, cfg)


def gemma4_experts(cfg: DecoderConfig, p: dict, lora: dict | None, dense: jax.Array, h: jax.Array, x):
    """The MoE block beside the MLP: dense [B, T, D] is the MLP's output, h [B, T, D] (float32) the stream
    before it. Returns (norm_1(dense) + norm_2(experts(pre_norm_2(h))) [B, T, D], router stats [2, E]);
    the router reads h RMS-normed, times its scale and D^-1/2."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    b, t, _ = h.shape
    routed = _rms(h, cfg.norm_eps) * p["moe"]["router_scale"]["scale"].astype(F32) * cfg.hidden_size**-0.5
    router = partial(linear, dtype=dt, lora_scale=x.lora_scale, product=lora_product_for(cfg))
    real = x.segment_ids > 0  # [B, T]
    m = norm(p["moe_norm"], h, cfg)
    out, stats = moe_mlp(cfg, p["moe"], (lora or {}).get("moe"), m, x.lora_scale, real, router, routed)
    both = norm(p["mlp_post_norm_1"], dense, cfg) + norm(p["moe_post_norm"], out, cfg)
    return both.astype(dt), stats


def _rows(cfg: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Params path under "layers" (without the leaf's name) -> the HF layers of its stack's rows."""
    return {e.path[1:-1]: layer_ids(e, cfg) for e in name_table(cfg) if e.per_layer}


def _regroup(tree: dict | None, rows: dict, span: range, groups: int) -> dict | None:
    """The stacks of a layer tree (weights or adapters) cut to the layers `span` and regrouped: each leaf's
    rows of those layers [n, ...] -> [groups, n / groups, ...] (a double-wide MLP under "mlp")."""
    if tree is None:
        return None
    out: dict = {}
    for group, sub in tree.items():
        for name, leaf in sub.items():
            mine = [r for r, i in enumerate(rows.get((group, name), rows.get((group,)))) if i in span]
            if mine:
                lo, n = mine[0], len(mine)
                cut = jax.tree.map(
                    lambda a, lo=lo, n=n: a[lo : lo + n].reshape(groups, -1, *a.shape[1:]), leaf
                )
                out.setdefault("mlp" if group == "wide_mlp" else group, {})[name] = cut
    return out


def _member(cfg: DecoderConfig, rows: dict, tree: dict | None, span: range, size: int) -> list:
    """For each layer j of a group of `size` (periodic in `span`): {(group, name): its row in the group}."""
    if tree is None:
        return [None] * size
    out = []
    for j in range(size):
        mine = {}
        for group, sub in tree.items():
            for name in sub:
                ids = [i for i in rows.get((group, name), rows.get((group,))) if i in span[:size]]
                if span[j] in ids:
                    mine["mlp" if group == "wide_mlp" else group, name] = ids.index(span[j])
        out.append(mine)
    return out


def _pick(tree: dict | None, member: dict | None) -> dict | None:
    """One layer's slice of a regrouped group (rows per `member`)."""
    if tree is None:
        return None
    out: dict = {}
    for (group, name), row in member.items():
        if group in tree and name in tree[group]:
            out.setdefault(group, {})[name] = jax.tree.map(lambda a, row=row: a[row], tree[group][name])
    return out


def layer_trees(cfg: DecoderConfig, tree: dict | None) -> list:
    """A layer tree (weights or adapters) as one tree per layer: layer i's row of each stack it is in (the
    double-wide MLP under "mlp"), as the scan's body picks it (None -> None per layer)."""
    if tree is None:
        return [None] * cfg.num_layers
    rows, out = _rows(cfg), []
    for i in range(cfg.num_layers):
        span = range(i, i + 1)
        one = jax.tree.map(lambda a: a[0], _regroup(tree, rows, span, 1))
        out.append(_pick(one, _member(cfg, rows, tree, span, 1)[0]))
    return out


def run_gemma4(cfg: DecoderConfig, make_layer, h: jax.Array, shared, per_layer: tuple, ple: jax.Array | None):
    """Every layer on h [B, T, D]: `make_layer(config)` gives the decoder's layer function for a config,
    `shared` the `LayerInputs` of every layer (its `cache` a `Gemma4Cache` in generation, else None),
    `per_layer` what `decoder.layer_stack` stacks, `ple` the per-layer inputs [B, T, L, P] or None. The
    layers with their own k/v, then the KV-shared ones, each scanned over groups of one period of their
    kinds (`hybrid_layers.period`; unrolled without `runtime.scan_layers`). Returns (h, (the updated
    `Gemma4Cache` or None, the router stats [L, 2, E] or None))."""
    cache = shared.cache
    first = sum(own_kv(k) for k in cfg.mixers)  # the KV-shared layers are the last ones
    stacks = None if cache is None else type_stacks(cache)
    kvs, stats = {}, []
    for span in (range(0, first), range(first, cfg.num_layers)):
        if len(span):
            own = stacks if span.start == 0 else None
            h, got, new, s = _segment(cfg, make_layer, h, shared, per_layer, ple, span, (kvs, own))
            if new:  # the KV-shared layers read their source's updated cache
                stacks = {**stacks, **new}
                kvs.update({i: tuple(a[r] for a in new[t]) for i, (t, r) in own_rows(cfg).items()})
            kvs.update(got)
            stats.append(s)
    stats = jnp.concatenate(stats) if cfg.num_experts else None
    return h, (None if cache is None else with_type_stacks(cache, stacks), stats)


def _segment(cfg: DecoderConfig, make_layer, h, shared, per_layer: tuple, ple, span: range, kv: tuple):
    """The layers `span` on h, scanned over groups of one period. kv: ({layer: (k, v)} of the layers
    KV-shared ones read, the cache's `type_stacks` of the span's layers or None). Returns (h, the (k, v) of
    the span's layers others read (without a cache), the updated stacks or None, router stats or None)."""
    params, lora, _, windows, scales, rngs, _ = per_layer
    kvs, stacks = kv
    kinds, rows, source = cfg.mixers[span.start : span.stop], _rows(cfg), kv_source(cfg)
    size = period(kinds) if cfg.runtime.scan_layers else len(kinds)
    groups, cut = len(kinds) // size, slice(span.start, span.stop)
    read = {source[i] for i in range(cfg.num_layers) if source[i] != i}  # the layers KV-shared ones read
    mine = [] if shared.cache is not None else [j for j in range(size) if span[len(kinds) - size + j] in read]

    def per(a):  # a per-layer array [L, ...] -> this span's [G, P, ...]
        return None if a is None else a[cut].reshape(groups, size, *a.shape[1:])

    xs = (
        _regroup(params, rows, span, groups),
        _regroup(lora, rows, span, groups),
        per(windows),
        per(scales),
        per(rngs),
        None if ple is None else per(jnp.moveaxis(ple, 2, 0)),  # [G, P, B, T, P_ple]
        _cache_rows(stacks, kinds[:size], groups),
    )
    body = _group_body(cfg, make_layer, shared, span, kinds[:size], (kvs, mine, rows, (params, lora)))
    if cfg.runtime.scan_layers:
        h, (got, new, stats) = jax.lax.scan(body, h, xs)
        got = jax.tree.map(lambda a: a[-1], got)
    else:
        h, (got, new, stats) = body(h, jax.tree.map(lambda a: a[0], xs))
        new, stats = jax.tree.map(lambda a: a[None], (new, stats))
    base = span.start + len(kinds) - size  # the last group's first layer
    kv_out = {base + j: got[j] for j in mine}
    new = None if new is None else jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new)  # [L_t, ...]
    return h, kv_out, new, None if stats is None else stats.reshape(-1, *stats.shape[2:])


def _cache_rows(stacks: dict | None, kinds: tuple[str, ...], groups: int) -> dict | None:
    """The cache's {type: (k, v) [L_type_own, ...]} regrouped [G, P_type_own, ...] (types with rows only)."""
    if stacks is None:
        return None
    out = {}
    for t, kv in stacks.items():
        n = sum(own_kv(k) and layer_type(k) == t for k in kinds)
        if n:
            out[t] = jax.tree.map(lambda a, n=n: a.reshape(groups, n, *a.shape[1:]), kv)
    return out


def _group_body(cfg: DecoderConfig, make_layer, shared, span: range, kinds: tuple[str, ...], ctx: tuple):
    """The scan's body over one group of the layers `kinds` (the first of `span`'s groups given; the others
    alike). ctx: ({layer: (k, v)} KV-shared layers read, the group's layers whose (k, v) to emit, `_rows`,
    (weights, adapters) trees). The body returns (h, (emitted (k, v) or None per layer, the cache's new
    {type: (k, v) [P_type_own, ...]} or None, router stats [P, 2, E] or None))."""
    kvs, mine, rows, (params, lora) = ctx
    inv, source, size, cache = inv_freqs(cfg), kv_source(cfg), len(kinds), shared.cache
    layers = {t: make_layer(kind_config(cfg, t)) for t in (SLIDING, FULL)}
    members = (_member(cfg, rows, params, span, size), _member(cfg, rows, lora, span, size))

    def body(h, xs):  # one group: `size` layers, unrolled
        p, lo, win, scale, rng, pl, kv = xs
        out, st, new = [], [], {}
        for j, kind in enumerate(kinds):
            i, t = span[j], layer_type(kind)
            row = sum(own_kv(k) and layer_type(k) == t for k in kinds[:j])  # in its type's cache rows
            src = None if own_kv(kind) else kvs[source[i]]  # a KV-shared layer's source's (k, v)
            view = src if kv is None or not own_kv(kind) else tuple(a[row] for a in kv[t])
            x = shared._replace(
                inv_freq=inv[t],
                window=win[j],
                lora_scale=scale[j],
                dropout_rng=None if rng is None else rng[j],
                ple=None if pl is None else pl[j],
                shared_kv=src,
                cache=None if cache is None else layer_view(cache, view),
            )
            h, (layer_kv, s) = layers[t](_pick(p, members[0][j]), _pick(lo, members[1][j]), h, x)
            out.append(layer_kv if j in mine else None)
            if cache is not None and own_kv(kind):
                new.setdefault(t, []).append(layer_kv)
            st.append(s)
        new = (
            None if cache is None else {t: jax.tree.map(lambda *a: jnp.stack(a), *v) for t, v in new.items()}
        )
        return h, (tuple(out), new, jnp.stack(st) if cfg.num_experts else None)

    return body
