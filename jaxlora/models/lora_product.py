"""The LoRA product `(x @ A) @ B`: plain under autodiff (`lora_product`), or with a hand-written backward
pass for XLA:CPU (`lora_product_cpu`, `model.lora_product: cpu`); `lora_product_for` picks one.

The default is the plain product under autodiff. On XLA:CPU autodiff computes dA = x^T @ (g @ B^T) in the
[in, r] orientation, which costs a transpose of the [tokens, in] activation or a slow dot; the CPU version
computes dA as [r, in] and transposes that small result instead. Measured on the stories260K train step
(batch 8, sequence 256, r = 8 on every linear layer, float32, 2 CPU cores) it makes the whole step about 16%
faster. No GPU measurement backs it, so it is a switch, not the default.
"""

import jax
import jax.numpy as jnp

from jaxlora.models.decoder_config import DecoderConfig


def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x @ a) @ b`: x [..., in], a [in, r], b [r, out] -> [..., out] (`lora_product="plain"`)."""
    xa = jnp.einsum("...i,ir->...r", x, a)  # [..., r]
    return jnp.einsum("...r,ro->...o", xa, b)


def lora_product_for(cfg: DecoderConfig):
    """The `(x @ A) @ B` function `cfg.runtime.lora_product` asks for ("auto": the CPU one on XLA:CPU)."""
    rt = cfg.runtime
    if rt.lora_product == "cpu" or (rt.lora_product == "auto" and rt.target_backend == "cpu"):
        return lora_product_cpu
    return lora_product


@jax.custom_vjp
def lora_product_cpu(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x @ a) @ b`: x [..., in], a [in, r], b [r, out] -> [..., out], the same values as the plain one."""
    return _fwd(x, a, b)[0]


def _fwd(x, a, b):
    xa = jnp.einsum("...i,ir->...r", x, a)  # [..., r]
    return jnp.einsum("...r,ro->...o", xa, b), (x, xa, a, b)


def _bwd(res, g):
    x, xa, a, b = res
    x2, xa2, g2 = x.reshape(-1, a.shape[0]), xa.reshape(-1, a.shape[1]), g.reshape(-1, b.shape[1])
    g_xa = g2 @ b.T  # [n, r]
    dx = (g_xa @ a.T).reshape(x.shape)  # [..., in]
    da_t = jax.lax.optimization_barrier(jnp.einsum("nr,ni->ri", g_xa, x2))  # keep the [r, in] orientation
    db = jnp.einsum("nr,no->ro", xa2, g2)  # [r, out]
    return dx, da_t.T, db


lora_product_cpu.defvjp(_fwd, _bwd)


def dora_weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
    """DoRA's column norm `||W + scale * A @ B||` per output, in float32, as PEFT's `get_weight_norm`.

    kernel: [..., in, out] dense float, a: [..., in, r], b: [..., r, out], scale: scalar or [...]
    -> [..., out]. The norm runs over the input axis (PEFT's weight is [out, in], norm over dim 1).
    """
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")  # [..., in, out]
    scale = jnp.asarray(scale, jnp.float32)[..., None, None]
    w = kernel.astype(jnp.float32) + scale * delta
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


def dora_factor(magnitude: jax.Array, norm: jax.Array, scale) -> jax.Array:
    """`m / ||W + scale B A||` [..., out], with the norm detached (DoRA paper 4.3, as PEFT); 1 where the
    layer is not adapted (scale 0), so a magnitude there neither acts nor receives a gradient."""
    scale = jnp.asarray(scale, jnp.float32)[..., None]
    ratio = magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)
    return jnp.where(scale != 0, ratio, 1.0)
