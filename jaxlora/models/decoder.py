"""One decoder-only transformer for Llama, Mistral, Qwen2, Qwen3 and GPT-2, as pure functions.

Parameters are a nested dict (a pytree) with HF's module names for every linear layer, so LoRA targets,
loading and PEFT export all use one vocabulary. Layer parameters are stacked on a leading axis `L` and
run with `jax.lax.scan`, so compile time does not grow with depth.

    params = {
      "embed": {"embedding": [V, D]},          "pos_embed": {"embedding": [P, D]}   (GPT-2)
      "layers": {
        "attn_norm": {"scale": [L, D], "bias"?},  "mlp_norm": {...},
        "attn": {"q_proj" | "k_proj" | "v_proj" | "o_proj" | "c_attn" | "c_proj":
                     {"kernel": [L, in, out], "bias"?},
                 "q_norm"?, "k_norm"?: {"scale": [L, H]}},
        "mlp": {"gate_proj" | "up_proj" | "down_proj" | "c_fc" | "c_proj": {"kernel": [L, in, out], "bias"?}},
      },
      "final_norm": {"scale": [D], "bias"?},  "lm_head": {"kernel": [D, V]}  (absent when tied)
    }

A linear `kernel` may also be a `jaxlora.quant.QuantizedTensor`; `lora` mirrors the targeted linear
layers with `{"a": [L, in, r], "b": [L, r, out]}` and is added as `base(x) + scale * B(A(dropout(x)))`.
Norms, softmax and logits run in float32; matmuls in `cfg.compute_dtype`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.config import DecoderConfig
from jaxlora.quant import as_kernel, qmatmul

Params = dict[str, Any]
NEG_INF = float(jnp.finfo(jnp.float32).min)


def linear(
    p: Params, x: jax.Array, dtype, lora: Params | None = None, lora_scale=None, drop=None
) -> jax.Array:
    """`x @ kernel + bias`, plus the LoRA update when `lora` holds {"a", "b"} for this layer.

    x: [..., in] -> [..., out]. `lora_scale` is alpha/r (times a 0/1 per-layer mask); `drop` is an
    optional function applying dropout to the LoRA input.
    """
    y = qmatmul(x, p["kernel"], dtype)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if lora is not None:
        xa = x if drop is None else drop(x)
        a = lora["a"]
        h = jnp.einsum("...i,ir->...r", xa.astype(a.dtype), a)
        delta = jnp.einsum("...r,ro->...o", h, lora["b"]) * lora_scale
        y = (y.astype(jnp.float32) + delta).astype(dtype)
    return y


def norm(p: Params, x: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """RMSNorm or LayerNorm (per `cfg.norm`) computed in float32, returned in float32."""
    x = x.astype(jnp.float32)
    if cfg.norm == "rms":
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return x * p["scale"].astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return x * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def rope_inv_freq(cfg: DecoderConfig) -> jax.Array:
    """Inverse frequencies [H/2] with `linear` or `llama3` scaling applied."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF's half-split RoPE. x: [B, T, N, H], positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_pos, q_seg, kv_pos, kv_seg, window) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment, key not padding, causal by position, inside the window.

    Segment id 0 marks padding. `window` is a traced int; 0 means no sliding window.
    """
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    delta = q_pos[:, :, None] - kv_pos[:, None, :]
    causal = delta >= 0
    in_window = (window == 0) | (delta < window)
    return (same & causal & in_window)[:, None]


def dot_attention(q, k, v, mask, cfg: DecoderConfig) -> jax.Array:
    """Grouped-query attention. q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, 1, T, S] -> [B, T, N, H]."""
    if cfg.attention == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    b, t, n, h = q.shape
    g = n // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _dropout_fn(rng, rate: float):
    if rng is None or rate == 0.0:
        return None

    def drop(x):
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    return drop


def block(
    cfg: DecoderConfig, p: Params, h: jax.Array, ctx: dict, lora: Params | None, lora_scale, rng, cache
):
    """One transformer layer. h: [B, T, D] float32 residual stream. Returns (h, new_cache)."""
    dt = jnp.dtype(cfg.compute_dtype)
    lo = lora or {}
    rngs = jax.random.split(rng, 8) if rng is not None else [None] * 8

    def lin(group, name, x, i):
        sub = lo.get(group, {}).get(name)
        drop = _dropout_fn(rngs[i], ctx["lora_dropout"]) if sub is not None else None
        return linear(p[group][name], x, dt, sub, lora_scale, drop)

    b, t, _ = h.shape
    x = norm(p["attn_norm"], h, cfg)
    if cfg.fused_qkv:
        qkv = lin("attn", "c_attn", x, 0)
        q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
    else:
        q, k, v = lin("attn", "q_proj", x, 0), lin("attn", "k_proj", x, 1), lin("attn", "v_proj", x, 2)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = norm(p["attn"]["q_norm"], q, cfg).astype(dt)
        k = norm(p["attn"]["k_norm"], k, cfg).astype(dt)
    if not cfg.learned_positions:
        q = apply_rope(q, ctx["positions"], ctx["inv_freq"])
        k = apply_rope(k, ctx["positions"], ctx["inv_freq"])
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")

    if cache is None:
        kv_pos, kv_seg, new_cache = ctx["positions"], ctx["segment_ids"], None
    else:
        idx = ctx["cache_index"]
        ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
        new_cache = {"k": ck, "v": cv}
        k, v = ck.astype(dt), cv.astype(dt)
        kv_pos, kv_seg = ctx["cache_positions"], ctx["cache_segments"]
    mask = attention_mask(ctx["positions"], ctx["segment_ids"], kv_pos, kv_seg, ctx["window"])
    out = dot_attention(q, k, v, mask, cfg).reshape(b, t, cfg.q_dim)
    out = lin("attn", "c_proj" if cfg.fused_qkv else "o_proj", out, 3)
    h = h + out.astype(jnp.float32)

    x = norm(p["mlp_norm"], h, cfg)
    if cfg.activation == "silu":
        gate, up = lin("mlp", "gate_proj", x, 4), lin("mlp", "up_proj", x, 5)
        mid = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dt)
        out = lin("mlp", "down_proj", mid, 6)
    else:
        mid = jax.nn.gelu(lin("mlp", "c_fc", x, 4).astype(jnp.float32), approximate=True).astype(dt)
        out = lin("mlp", "c_proj", mid, 6)
    h = h + out.astype(jnp.float32)
    return checkpoint_name(h, "residual"), new_cache


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def default_positions(input_ids: jax.Array) -> jax.Array:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def embed(params: Params, cfg: DecoderConfig, input_ids, positions) -> jax.Array:
    """Token (and GPT-2 position) embeddings as the float32 residual stream [B, T, D]."""
    h = jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(jnp.float32)
    if cfg.learned_positions:
        h = h + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(jnp.float32)
    return h


def lm_head_kernel(params: Params, cfg: DecoderConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    dt = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].astype(dt).T
    return as_kernel(params["lm_head"]["kernel"], dt)


def logits_from_hidden(params: Params, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V]."""
    dt = jnp.dtype(cfg.compute_dtype)
    w = lm_head_kernel(params, cfg)
    return jnp.einsum("...d,dv->...v", hidden.astype(dt), w, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    cfg: DecoderConfig,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    lora: Params | None = None,
    lora_scale: float | jax.Array = 1.0,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    cache: dict | None = None,
    return_hidden: bool = False,
):
    """Run the decoder.

    input_ids, positions, segment_ids: [B, T] int32 (segment 0 = padding; packed rows use 1, 2, ...).
    lora: the trainable tree for the `layers` (see module doc); `lora_scale` is a scalar or a per-layer
    [L] array (0 for layers not transformed). cache: from `jaxlora.models.generate.init_cache`, with
    `index`, `positions`, `segments` already holding this step's entries.
    Returns float32 logits [B, T, V] (or the final-normed hidden [B, T, D] with `return_hidden`), and
    the updated cache when one was given.
    """
    if positions is None:
        positions = default_positions(input_ids)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    ctx = {
        "positions": positions,
        "segment_ids": segment_ids,
        "inv_freq": rope_inv_freq(cfg),
        "lora_dropout": lora_dropout,
    }
    if cache is not None:
        ctx.update(
            cache_index=cache["index"], cache_positions=cache["positions"], cache_segments=cache["segments"]
        )
    h = embed(params, cfg, input_ids, positions)

    scale = jnp.broadcast_to(jnp.asarray(lora_scale, jnp.float32), (cfg.num_layers,))
    rngs = jax.random.split(dropout_rng, cfg.num_layers) if dropout_rng is not None else None
    xs = {
        "p": params["layers"],
        "lora": lora,
        "scale": scale,
        "window": jnp.asarray(cfg.sliding_windows, jnp.int32),
        "rng": rngs,
        "cache": None if cache is None else {"k": cache["k"], "v": cache["v"]},
    }

    def body(h, x):
        layer_ctx = dict(ctx, window=x["window"])
        h, new_cache = block(cfg, x["p"], h, layer_ctx, x["lora"], x["scale"], x["rng"], x["cache"])
        return h, new_cache

    h, new_kv = jax.lax.scan(_remat(body, cfg.remat), h, xs)
    h = norm(params["final_norm"], h, cfg)
    out = h if return_hidden else logits_from_hidden(params, cfg, h)
    if cache is None:
        return out
    return out, dict(cache, k=new_kv["k"], v=new_kv["v"])
