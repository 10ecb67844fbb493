"""Running Gemma 4's text decoder (`gemma4_text`): its attention, per-layer input embeddings, KV sharing.

The weights are declared in `jaxlora.models.gemma4_spec`: each layer type's attention weights are stacked
apart (a full layer's head dim and kv heads differ), and the KV-shared layers have no k/v weights.
`run_gemma4` runs the layers one by one (unrolled, static slices of each stack): layer i reads its row of
every stack it is in, the decoder's `block` runs on a config whose head dim and kv heads are its type's,
and a KV-shared layer attends with the keys and values of its source layer (`gemma4_spec.kv_source`).

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

from jaxlora.errors import UserError
from jaxlora.models.attention import attend
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.gemma4_spec import kv_source, layer_type
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
    [B, T, K, H] each: what a KV-shared layer reading this one attends with)."""
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
    out, _ = attend(q, k, v, cfg, x.positions, x.segment_ids, x.window)  # [B, T, N, H]
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


def _layer(tree: dict | None, rows: dict, i: int) -> dict | None:
    """Layer i's slice of a layer tree (weights or adapters): its row of every stack it is in."""
    if tree is None:
        return None
    out: dict = {}
    for group, sub in tree.items():
        for name, leaf in sub.items():
            ids = rows.get((group, name), rows.get((group,)))
            if i in ids:
                row = ids.index(i)
                mine = "mlp" if group == "wide_mlp" else group  # a double-wide MLP is the layer's MLP
                out.setdefault(mine, {})[name] = jax.tree.map(lambda a, row=row: a[row], leaf)
    return out


def run_gemma4(cfg: DecoderConfig, make_layer, h: jax.Array, shared, per_layer: tuple, ple: jax.Array | None):
    """Every layer on h [B, T, D], unrolled: `make_layer(config)` gives the decoder's layer function for a
    config, `shared` the `LayerInputs` of every layer, `per_layer` what `decoder.layer_stack` stacks, `ple`
    the per-layer inputs [B, T, L, P] or None. Returns (h, (None, the router stats [L, 2, E] or None))."""
    params, lora, _, windows, scales, rngs, kv = per_layer
    if kv is not None:
        raise UserError(
            f"generation with a KV cache is not supported for {cfg.model_type} (KV-shared layers) yet"
        )
    rows, inv, source, kvs, stats = _rows(cfg), inv_freqs(cfg), kv_source(cfg), {}, []
    layers = {kind: make_layer(kind_config(cfg, kind)) for kind in (SLIDING, FULL)}
    for i, kind in enumerate(cfg.mixers):
        x = shared._replace(
            inv_freq=inv[layer_type(kind)],
            window=windows[i],
            lora_scale=scales[i],
            dropout_rng=None if rngs is None else rngs[i],
            ple=None if ple is None else ple[:, :, i],
            shared_kv=None if source[i] == i else kvs[source[i]],
        )
        h, (kvs[i], s) = layers[layer_type(kind)](_layer(params, rows, i), _layer(lora, rows, i), h, x)
        stats.append(s)
    return h, (None, jnp.stack(stats) if cfg.num_experts else None)
