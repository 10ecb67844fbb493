"""One decoder-only transformer for Llama, Mistral, Qwen2, Qwen3 and GPT-2, as pure functions.

Parameters are a nested dict (a pytree) with HF's module names for every linear layer, so LoRA targets,
loading and PEFT export all use one vocabulary. Layer parameters are stacked on a leading axis `L` and
run with `jax.lax.scan`, so compile time does not grow with depth (`cfg.scan_layers=False` unrolls).

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
Norms, softmax and logits run in float32; matmuls in `cfg.compute_dtype`. Attention lives in
`jaxlora.models.attention`. Shapes: B batch, T tokens, D hidden, N/K query/key-value heads, H head dim,
F MLP width, r LoRA rank.
"""

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.attention import RESIDUALS, KVCache, attend
from jaxlora.models.config import DecoderConfig
from jaxlora.models.lora_product import lora_product_cpu
from jaxlora.quant import as_kernel, qmatmul

Params = dict[str, Any]
F32 = jnp.float32

# --- rematerialization: what each `cfg.remat` keeps for the backward pass ---------------------------------
#
# The layer tags its activations with `checkpoint_name` (query, key, value, attention_residuals,
# mlp_input, mlp_gate, mlp_up, residual); a policy other than "none" wraps each layer in `jax.checkpoint`.
#
#   none   no jax.checkpoint: the backward pass reads everything the forward pass computed. Most memory.
#   lean   the large matmul outputs: q, k, v after RoPE, what the attention kernel keeps for its backward
#          pass (output and log-sum-exp), the residual stream after attention (mlp_input) and the MLP's
#          gate and up projections. Recomputes the norms, RoPE, activations, dropout masks and the rank-r
#          LoRA products x @ A: cheaper than storing them as float32.
#   dots   every matmul output without batch dimensions (the frozen and LoRA projections); recomputes
#          the rest, the attention forward included.
#   full   only the layer's input; recomputes the whole layer.
LEAN_SAVED = ("query", "key", "value", RESIDUALS, "mlp_input", "mlp_gate", "mlp_up")
REMAT = {
    "none": None,
    "lean": jax.checkpoint_policies.save_only_these_names(*LEAN_SAVED),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

# Each adapted module draws its LoRA dropout mask from its own key, fold_in(layer key, stream). GPT-2's
# fused modules share the stream of the Llama module they stand in for (so masks match older releases).
DROPOUT_STREAMS = {
    ("attn", "q_proj"): 0,
    ("attn", "c_attn"): 0,
    ("attn", "k_proj"): 1,
    ("attn", "v_proj"): 2,
    ("attn", "o_proj"): 3,
    ("attn", "c_proj"): 3,
    ("mlp", "gate_proj"): 4,
    ("mlp", "c_fc"): 4,
    ("mlp", "up_proj"): 5,
    ("mlp", "down_proj"): 6,
    ("mlp", "c_proj"): 6,
}


class LayerInputs(NamedTuple):
    """What one layer reads besides its weights, its adapters and the residual stream."""

    positions: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32, 0 = padding, packed rows 1, 2, ...
    inv_freq: jax.Array  # [H/2] float32, RoPE inverse frequencies
    window: jax.Array  # int32 scalar: this layer's sliding window, 0 = full attention
    lora_scale: jax.Array  # float32 scalar: alpha/r for this layer, 0 where it is not adapted
    dropout_rng: jax.Array | None = None  # this layer's LoRA dropout key; None = no dropout
    cache: KVCache | None = None  # this layer's slice of the KV cache (generation); None = training


# --- building blocks ----------------------------------------------------------------------------------------


def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x @ a) @ b`: x [..., in], a [in, r], b [r, out] -> [..., out] (`cfg.lora_product="plain"`)."""
    xa = jnp.einsum("...i,ir->...r", x, a)  # [..., r]
    return jnp.einsum("...r,ro->...o", xa, b)


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def linear(
    p: Params,
    x: jax.Array,
    dtype,
    lora: Params | None = None,
    lora_scale=None,
    dropout_key: jax.Array | None = None,
    dropout_rate: float = 0.0,
    product=lora_product,
) -> jax.Array:
    """`x @ kernel + bias`, plus `lora_scale * B(A(dropout(x)))` when `lora` holds {"a", "b"}.

    x: [..., in] -> [..., out] in `dtype`. `lora_scale` is alpha/r (times a 0/1 per-layer mask);
    `product` computes `(x @ A) @ B` (`lora_product` or `lora_product_cpu`).
    """
    y = qmatmul(x, p["kernel"], dtype)  # [..., out]
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if lora is None:
        return y
    if dropout_key is not None:
        x = dropout(x, dropout_key, dropout_rate)
    a = lora["a"]
    delta = product(x.astype(a.dtype), a, lora["b"]) * lora_scale  # [..., out] float32
    return (y.astype(F32) + delta).astype(dtype)


def norm(p: Params, x: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """RMSNorm or LayerNorm (per `cfg.norm`) over the last axis, computed and returned in float32."""
    x = x.astype(F32)
    if cfg.norm == "rms":
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return x * p["scale"].astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return x * p["scale"].astype(F32) + p["bias"].astype(F32)


def rope_inv_freq(cfg: DecoderConfig) -> jax.Array:
    """Inverse frequencies [H/2] with `linear` or `llama3` scaling applied."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
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
    """HF's half-split RoPE. x: [B, T, N, H], positions: [B, T], inv_freq: [H/2] -> [B, T, N, H]."""
    angles = positions[..., None].astype(F32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]  # [B, T, 1, H]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def lora_product_for(cfg: DecoderConfig):
    """The `(x @ A) @ B` function `cfg.lora_product` asks for."""
    if cfg.lora_product == "cpu" or (cfg.lora_product == "auto" and jax.default_backend() == "cpu"):
        return lora_product_cpu
    return lora_product


def _project(cfg: DecoderConfig, p: Params, lora: Params, x: LayerInputs, rate: float, group, name, inp):
    """The layer's linear `p[group][name]` on `inp`, with its adapter and dropout when it has one."""
    adapter = lora.get(group, {}).get(name)
    key = None
    if adapter is not None and x.dropout_rng is not None and rate > 0.0:
        key = jax.random.fold_in(x.dropout_rng, DROPOUT_STREAMS[group, name])
    dt = jnp.dtype(cfg.compute_dtype)
    return linear(p[group][name], inp, dt, adapter, x.lora_scale, key, rate, lora_product_for(cfg))


# --- the layer and the model --------------------------------------------------------------------------------


def block(cfg: DecoderConfig, p: Params, lora: Params | None, h: jax.Array, x: LayerInputs, lora_dropout=0.0):
    """One transformer layer (pre-norm). h: [B, T, D] float32 residual stream; p, lora: this layer's.

    Returns (h, this layer's updated cache (k, v) or None).
    """
    dt = jnp.dtype(cfg.compute_dtype)
    b, t, _ = h.shape
    proj = partial(_project, cfg, p, lora or {}, x, lora_dropout)

    # Attention: norm -> q, k, v -> RoPE -> attention -> output projection -> residual.
    a = norm(p["attn_norm"], h, cfg)  # [B, T, D]
    if cfg.fused_qkv:
        qkv = proj("attn", "c_attn", a)  # [B, T, (N + 2K) * H]
        q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
    else:
        q, k, v = proj("attn", "q_proj", a), proj("attn", "k_proj", a), proj("attn", "v_proj", a)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    if cfg.qk_norm:
        q = norm(p["attn"]["q_norm"], q, cfg).astype(dt)
        k = norm(p["attn"]["k_norm"], k, cfg).astype(dt)
    if not cfg.learned_positions:
        q = apply_rope(q, x.positions, x.inv_freq)
        k = apply_rope(k, x.positions, x.inv_freq)
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
    out, new_kv = attend(q, k, v, cfg, x.positions, x.segment_ids, x.window, x.cache)  # [B, T, N, H]
    out = proj("attn", "c_proj" if cfg.fused_qkv else "o_proj", out.reshape(b, t, cfg.q_dim))  # [B, T, D]
    h = checkpoint_name(h + out.astype(F32), "mlp_input")

    # MLP: norm -> gate and up (or GPT-2's c_fc) -> activation -> down projection -> residual.
    m = norm(p["mlp_norm"], h, cfg)  # [B, T, D]
    if cfg.activation == "silu":
        gate = checkpoint_name(proj("mlp", "gate_proj", m), "mlp_gate")  # [B, T, F]
        up = checkpoint_name(proj("mlp", "up_proj", m), "mlp_up")  # [B, T, F]
        out = proj("mlp", "down_proj", (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(dt))
    else:
        up = checkpoint_name(proj("mlp", "c_fc", m), "mlp_up")  # [B, T, F]
        out = proj("mlp", "c_proj", jax.nn.gelu(up.astype(F32), approximate=True).astype(dt))
    h = h + out.astype(F32)  # [B, T, D]
    return checkpoint_name(h, "residual"), new_kv


def default_positions(input_ids: jax.Array) -> jax.Array:
    """0, 1, ..., T - 1 for every row: [B, T] int32."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def embed(params: Params, cfg: DecoderConfig, input_ids, positions) -> jax.Array:
    """Token (and GPT-2 position) embeddings as the float32 residual stream [B, T, D]."""
    h = jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(F32)
    if cfg.learned_positions:
        h = h + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(F32)
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
    return jnp.einsum("...d,dv->...v", hidden.astype(dt), w, preferred_element_type=F32)


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
    cache: KVCache | None = None,
    return_hidden: bool = False,
):
    """Run the decoder.

    input_ids, positions, segment_ids: [B, T] int32 (segment 0 = padding; packed rows use 1, 2, ...).
    lora: the trainable tree for the `layers` (see module doc); `lora_scale` is a scalar or a per-layer
    [L] array (0 for layers not transformed). cache: from `jaxlora.models.generate.init_cache`, with
    `positions` and `segment_ids` already holding this step's entries at `index`.
    Returns float32 logits [B, T, V] (or the final-normed hidden [B, T, D] with `return_hidden`), and
    the updated cache when one was given.
    """
    if positions is None:
        positions = default_positions(input_ids)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    layers = cfg.num_layers
    h = embed(params, cfg, input_ids, positions)  # [B, T, D]
    inv_freq = rope_inv_freq(cfg)  # [H/2]
    shared = LayerInputs(positions, segment_ids, inv_freq, window=None, lora_scale=None, cache=cache)
    per_layer = (  # scanned over the leading [L] axis
        params["layers"],
        lora,
        jnp.asarray(cfg.sliding_windows, jnp.int32),  # [L]
        jnp.broadcast_to(jnp.asarray(lora_scale, F32), (layers,)),  # [L]
        None if dropout_rng is None else jax.random.split(dropout_rng, layers),
        None if cache is None else (cache.k, cache.v),  # [L, B, S, K, H] each
    )
    layer = partial(block, cfg, lora_dropout=lora_dropout)
    if cache is None and REMAT[cfg.remat] is not None:
        # Under scan XLA cannot merge the recomputation into the forward pass anyway; the barriers that
        # prevent it would only slow the step (about 6% on the CPU benchmark).
        layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)

    def one_layer(h, xs):
        p, lo, window, scale, rng, kv = xs
        layer_cache = None if kv is None else cache._replace(k=kv[0], v=kv[1])
        x = shared._replace(window=window, lora_scale=scale, dropout_rng=rng, cache=layer_cache)
        return layer(p, lo, h, x)

    if cfg.scan_layers:
        h, new_kv = jax.lax.scan(one_layer, h, per_layer)
    else:  # one copy of the layer per layer in the program: static slices, no stacked residuals
        kvs = []
        for i in range(layers):
            h, kv = one_layer(h, jax.tree.map(lambda a, i=i: a[i], per_layer))
            kvs.append(kv)
        new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
    h = norm(params["final_norm"], h, cfg)
    out = h if return_hidden else logits_from_hidden(params, cfg, h)
    if cache is None:
        return out
    return out, cache._replace(k=new_kv[0], v=new_kv[1])
