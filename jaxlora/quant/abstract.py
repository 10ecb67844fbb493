"""The shapes `quantize` would give, without any weights: a `QuantizedTensor` of `jax.ShapeDtypeStruct`s.

`jaxlora plan` (`jaxlora.train.memory_plan`) builds the base model from `config.json` alone; this is its
quantized kernel. The layouts are those of `jaxlora.quant.tensor` (its module docstring); tests check
both against each other.
"""

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.quant.mxfp4 import BLOCK as MXFP4_BLOCK
from jaxlora.quant.mxfp4 import check_block_size
from jaxlora.quant.tensor import NF4_BLOCK, SCALE_GROUP, QuantizedTensor, _check_block


def abstract_quantize(
    lead: tuple[int, ...], kernel: tuple[int, int], method: str, block_size: int | None = None, name: str = ""
) -> QuantizedTensor:
    """What `quantize(w [*kernel], method, block_size)` returns, stacked over `lead` (e.g. `(L,)` or
    `(L, E)`), as abstract arrays. `kernel` is one slice's `(in, out)`; the loader quantizes float32 host
    arrays, so `orig_dtype` is float32. Raises the same UserError as `quantize` for a block size that
    does not divide `in`."""
    n_in, n_out = kernel
    label = f"{name or 'tensor'} {[*lead, n_in, n_out]}"
    if method == "int8":
        bs = n_in if block_size is None else int(block_size)
        _check_block(bs, n_in, label, "or block_size=None for one scale per output column")
        return QuantizedTensor(
            _sds((*lead, n_in, n_out), np.int8),
            scale=_sds((*lead, n_in // bs, n_out), np.float32),
            method="int8",
            block_size=bs,
            kernel_shape=(n_in, n_out),
        )
    if method == "mxfp4":
        check_block_size(block_size)
        n_pad = n_in + (-n_in % MXFP4_BLOCK)
        return QuantizedTensor(
            _sds((*lead, n_pad // 2, n_out), np.uint8),
            scale=_sds((*lead, n_pad // MXFP4_BLOCK, n_out), np.uint8),
            method="mxfp4",
            block_size=MXFP4_BLOCK,
            kernel_shape=(n_in, n_out),
            pad=n_pad - n_in,
        )
    if method != "nf4":
        raise UserError(f"quantization method {method!r} for {name or 'tensor'}: choose int8, nf4 or mxfp4")
    bs = NF4_BLOCK if block_size is None else int(block_size)
    if block_size is not None:
        _check_block(bs, n_in, label, f"or leave the block size unset for {NF4_BLOCK} with zero padding")
    if bs % 2:
        raise UserError(f"nf4 block size {bs} for {label} must be even (two 4-bit codes per byte)")
    pad = -n_in % bs
    n_groups = -(-((n_in + pad) // bs * n_out) // SCALE_GROUP)
    return QuantizedTensor(
        _sds((*lead, (n_in + pad) // 2, n_out), np.uint8),
        scale_codes=_sds((*lead, n_groups, SCALE_GROUP), np.int8),
        scale_absmax=_sds((*lead, n_groups), np.float32),
        scale_mean=_sds((*lead, 1), np.float32),
        method="nf4",
        block_size=bs,
        kernel_shape=(n_in, n_out),
        pad=pad,
    )


def _sds(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
