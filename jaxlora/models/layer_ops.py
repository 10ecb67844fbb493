"""The decoder's building blocks: the linear layer with its LoRA / DoRA adapter, the norms, dropout.

Shapes: `[..., in] -> [..., out]` for a linear layer (kernel [in, out], LoRA A [in, r], B [r, out]); norms
over the last axis. Used by `jaxlora.models.decoder` (which re-exports them) and its MoE block.
"""

import jax
import jax.numpy as jnp

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.lora_product import dora_factor, dora_weight_norm, lora_product
from jaxlora.quant import as_kernel, qmatmul

Params = dict  # a layer's weights or adapters (see `jaxlora.models.decoder`)
F32 = jnp.float32


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
    `product` computes `(x @ A) @ B` (`lora_product` or `lora_product_cpu`). Optional adapter leaves:
    "s" (scalar, not trained) multiplies `lora_scale` for this module (PEFT's rank/alpha patterns);
    "bias" [out] is PEFT's lora_B bias (inside the scale); "m" [out] makes it DoRA, as PEFT:
    `y + (f - 1) * (W dropout(x)) + f * scale * B A dropout(x)` with `f = m / ||W + scale B A||` (the norm
    per output column, detached).
    """
    y = qmatmul(x, p["kernel"], dtype)  # [..., out]
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if lora is None:
        return y
    if "s" in lora:
        lora_scale = lora_scale * jax.lax.stop_gradient(lora["s"])
    if dropout_key is not None:
        x = dropout(x, dropout_key, dropout_rate)
    a = lora["a"]
    xab = product(x.astype(a.dtype), a, lora["b"])  # [..., out] float32
    if "bias" in lora:  # PEFT's lora_bias: lora_B's own bias
        xab = xab + lora["bias"]
    delta = xab * lora_scale
    if "m" not in lora:
        return (y.astype(F32) + delta).astype(dtype)
    w = as_kernel(p["kernel"], F32)  # [in, out]
    f = dora_factor(lora["m"], dora_weight_norm(w, a, lora["b"], lora_scale), lora_scale)  # [out]
    if dropout_key is None:
        base = y.astype(F32) - (p["bias"].astype(F32) if "bias" in p else 0.0)
    else:
        base = qmatmul(x, p["kernel"], dtype).astype(F32)  # W dropout(x), as PEFT in training
    return (y.astype(F32) + (f - 1.0) * base + f * delta).astype(dtype)


def norm(p: Params, x: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """RMSNorm (scale `w + cfg.norm_offset`: Gemma's 1 + w) or LayerNorm (per `cfg.norm`) over the last
    axis, computed and returned in float32."""
    x = x.astype(F32)
    if cfg.norm == "rms":
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return x * (p["scale"].astype(F32) + cfg.norm_offset)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return x * p["scale"].astype(F32) + p["bias"].astype(F32)
