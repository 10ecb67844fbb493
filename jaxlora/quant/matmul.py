"""The device side of quantized kernels: dequantize and the matmul that reads them (pure jnp, jit-friendly).

`qmatmul` has a custom VJP keeping only the quantized residuals; XLA fuses the dequantization with its
neighbours.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.quant.mxfp4 import FP4_E2M1, POW2
from jaxlora.quant.tensor import METHODS, NF4_CODE, QuantizedTensor, unpack_nf4


def dequantize(q: QuantizedTensor, dtype=None) -> jax.Array:
    """Dense kernel [..., in, out] in `dtype` (default: the original dtype), with gradients stopped.

    Arithmetic is float32 and rounds once to `dtype`; inside jit XLA fuses it into one elementwise kernel.
    """
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    lead = q.lead_shape
    n_in, n_out = q.kernel_shape
    n_pad = n_in + q.pad  # rows actually stored (zero padding at the end of `in`)
    nb, bs = n_pad // q.block_size, q.block_size
    if q.method == "int8":
        w = jnp.asarray(q.data).astype(jnp.float32).reshape(lead + (nb, bs, n_out))
        w = w * jnp.asarray(q.scale)[..., :, None, :]  # [..., nb, bs, out] * [..., nb, 1, out]
    elif q.method == "nf4":
        # block scales: int8 [..., S, 256] * absmax/127 [..., S, 1] + mean -> [..., nb, 1, out]
        s = jnp.asarray(q.scale_codes).astype(jnp.float32) * (jnp.asarray(q.scale_absmax)[..., None] / 127)
        s = s.reshape(lead + (-1,))[..., : nb * n_out] + jnp.asarray(q.scale_mean)
        s = s.reshape(lead + (nb, 1, n_out))
        vals = jnp.asarray(NF4_CODE)[unpack_nf4(q.data)]  # [..., in, out] in [-1, 1]
        w = vals.reshape(lead + (nb, bs, n_out)) * s
    elif q.method == "mxfp4":
        # e2m1 values [..., P, out] times 2 ** (s - 127) [..., nb, 1, out]: exact in float32 and bfloat16
        # (2 significant bits, an 8-bit exponent) unless the product is subnormal, where XLA may flush
        s = jnp.asarray(POW2)[jnp.asarray(q.scale)][..., :, None, :]
        vals = jnp.asarray(FP4_E2M1)[unpack_nf4(q.data)]
        w = vals.reshape(lead + (nb, bs, n_out)) * s
    else:
        raise UserError(f"unknown quantization method {q.method!r}: choose one of {', '.join(METHODS)}")
    w = w.reshape(lead + (n_pad, n_out))[..., :n_in, :]
    return jax.lax.stop_gradient(w.astype(dtype))


def as_kernel(w, dtype) -> jax.Array:
    """Dense kernel [..., in, out] in `dtype` from a plain array or a `QuantizedTensor`.

    For `x @ as_kernel(w, dtype)` under `jax.grad`, JAX saves the *dense* kernel as a backward residual
    (per layer, under scan) unless the layer is rematerialized; `qmatmul` saves only the quantized one.
    """
    if isinstance(w, QuantizedTensor):
        return dequantize(w, dtype)
    return jnp.asarray(w).astype(dtype)


def qmatmul(x: jax.Array, w, compute_dtype=None) -> jax.Array:
    """`x [..., in] @ w [in, out] -> [..., out]` in `compute_dtype` (default x.dtype).

    `w` is a plain array (ordinary autodiff) or a per-layer `QuantizedTensor` (no leading dims; slice a
    stacked one with scan or indexing first). For a quantized `w` the gradient reaches `x` only, and the
    backward pass recomputes the dense kernel from the quantized one, so the saved residual is the quantized
    weight rather than a dense copy (as bitsandbytes' 4-bit matmul does). Reverse mode only (custom_vjp).
    """
    dtype = jnp.dtype(compute_dtype or jnp.result_type(x))
    x = jnp.asarray(x).astype(dtype)
    if not isinstance(w, QuantizedTensor):
        return jnp.einsum("...i,io->...o", x, jnp.asarray(w).astype(dtype))
    if w.lead_shape:
        raise ValueError(f"qmatmul takes a per-layer kernel, got {w!r}; slice the leading dims first")
    return _qmatmul(x, w, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x, w, dtype):
    return jnp.einsum("...i,io->...o", x, dequantize(w, dtype))


def _qmatmul_fwd(x, w, dtype):
    return _qmatmul(x, w, dtype), w


def _qmatmul_bwd(dtype, w, g):
    dx = jnp.einsum("...o,io->...i", g, dequantize(w, dtype))
    return dx, None  # no cotangent for the frozen weight


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def dequantize_params(tree, dtype=None):
    """`tree` with every `QuantizedTensor` replaced by its dense kernel (in `dtype`, default its own).

    This is the base a merged export must add LoRA deltas to: the adapters were trained against these
    values, not against the original float checkpoint.
    """
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    return jax.tree.map(lambda a: dequantize(a, dtype) if is_q(a) else a, tree, is_leaf=is_q)
