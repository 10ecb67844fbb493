"""Frozen base weights in int8, NF4 or MXFP4, and the matmul that reads them (QLoRA's storage, for XLA).

A linear kernel is stored in JAX orientation, `kernel[..., in, out]` with `y = x @ kernel`, possibly stacked
over layers (`[L, in, out]`, run with `lax.scan`). `quantize` turns one such kernel into a `QuantizedTensor`
on the host (numpy); the model calls `qmatmul(x, w, dtype)` (or `x @ as_kernel(w, dtype)`) inside jit, and the
dequantization is pure `jnp`, so XLA fuses it with its neighbours.

Layouts (`...` = the kernel's leading dims, e.g. `[L]`; every array leaf keeps them, so `lax.scan` over axis 0
or `jax.tree.map(lambda a: a[i], q)` gives a valid per-layer `QuantizedTensor`):

  int8  data  int8    [..., in, out]         w ~= data * scale, symmetric absmax
        scale float32 [..., in // block, out] block = in (one scale per output column) unless `block_size`
  nf4   data  uint8   [..., P // 2, out]     two 4-bit codes per byte: row 2k in the low nibble, 2k+1 high
        scale_codes  int8    [..., S, 256]   absmax of each 64-block along `in`, double-quantized (below)
        scale_absmax float32 [..., S]        absmax of each 256-group of centred block scales
        scale_mean   float32 [..., 1]        mean of the block scales (subtracted before the 8-bit step)
  mxfp4 data  uint8   [..., P // 2, out]     two e2m1 codes per byte, packed as nf4's (`jaxlora.quant.mxfp4`)
        scale uint8   [..., P // 32, out]    e8m0 exponent of each 32-block along `in`: 2 ** (s - 127)

Padding: with the default NF4 block (64) an `in` that 64 does not divide (stories260K's `down_proj` has
in = 172) is padded with zero rows up to P = the next multiple of 64 (MXFP4: of 32) before quantizing;
`pad = P - in` is static metadata and `dequantize` slices the zero rows off, so the dense kernel is
[..., in, out] again.
Zero rows cost nothing in accuracy (they quantize exactly to the code 0.0). A block size the user chose
explicitly must divide `in` (a UserError names the tensor otherwise): padding then would silently change
what that choice means. int8's default (one scale per column) never needs padding.

NF4 (Dettmers et al. 2023, "QLoRA", sec. 3 and app. E): w ~= NF4[code] * block_absmax, blocks of 64
consecutive `in` values for each `out` column, so dequantization is a reshape and a broadcast multiply.
Double quantization: the float32 block scales of one slice (`P // 64 * out` of them, flattened row-major
and zero-padded after centring to `S * 256`) have their mean subtracted and are stored as int8 with one
float32 absmax per group of 256. QLoRA uses an 8-bit float there; symmetric int8 on the centred scales is
simpler and its error (<= absmax/254 of the group deviation) is far below NF4's own.

MXFP4 (the OCP microscaling format gpt-oss ships its experts in): w = e2m1[code] * 2 ** (s - 127). A
checkpoint's MXFP4 tensors are kept bit for bit (`from_mxfp4`); other kernels are encoded by the OCP rule
(`jaxlora.quant.mxfp4.encode`). No double quantization: the scale is already one byte.

Bytes per weight: int8 1 + 4/in (per-channel); nf4 0.5 + 1/64 + 4/(64*256) ~= 0.516; mxfp4 0.5 + 1/32 =
0.531 (4.25 bits), i.e. 0.50x, 0.26x and 0.27x of bfloat16.
"""

import dataclasses
import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlora.errors import UserError
from jaxlora.quant import mxfp4

METHODS = ("none", "int8", "nf4", "mxfp4")
NF4_BLOCK = 64  # default NF4 block along `in`
SCALE_GROUP = 256  # NF4 double quantization: block scales per 8-bit group
_CHUNK = 1 << 21  # elements per host-side work chunk (bounds numpy temporaries)


def nf4_code_values() -> np.ndarray:
    """The 16 NormalFloat4 code values, ascending, float32 [16], in [-1, 1] with an exact 0.

    Derivation (QLoRA app. E): NF4 takes quantiles of N(0, 1) so each code covers equal probability mass,
    asymmetric so that 0 is exact: 8 positive codes are the quantiles at 8 probabilities evenly spaced from
    `delta` down to (excluding) 0.5, 7 negative codes the mirrored quantiles at 7 probabilities evenly spaced
    from `delta` down to (excluding) 0.5, plus 0. The extreme quantile would be infinite, so the range is
    cut at `delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2`, the mean of the centre of the last bin for 15 and for
    16 equal-mass bins. Dividing by the largest value maps the codes to [-1, 1].
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = [inv_cdf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    neg = [-inv_cdf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    v = np.array(sorted(neg + [0.0] + pos), np.float64)
    return (v / v.max()).astype(np.float32)


NF4_CODE = nf4_code_values()
_NF4_MID = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # [15] decision thresholds between neighbouring codes


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized kernel `[..., in, out]` (layouts in the module docstring); a JAX pytree.

    Array fields are pytree leaves (unused ones are None); `method`, `block_size`, `kernel_shape` (the
    per-slice dense `(in, out)`, valid after scan slicing), `orig_dtype` and `pad` (zero rows appended to
    `in` before quantizing, dropped by `dequantize`) are static metadata.
    `shape` and `dtype` describe the dense kernel it stands for, so `w.shape[-1]` works as for an array.
    """

    data: Any
    scale: Any = None
    scale_codes: Any = None
    scale_absmax: Any = None
    scale_mean: Any = None
    method: str = "int8"
    block_size: int = 0
    kernel_shape: tuple[int, int] = (0, 0)
    orig_dtype: str = "float32"
    pad: int = 0

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lead_shape + tuple(self.kernel_shape)

    @property
    def dtype(self) -> np.dtype:
        return _np_dtype(self.orig_dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor({self.method}, shape={list(self.shape)}, block={self.block_size}, "
            f"{f'pad={self.pad}, ' if self.pad else ''}from {self.orig_dtype}, {human_bytes(nbytes(self))})"
        )


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["data", "scale", "scale_codes", "scale_absmax", "scale_mean"],
    meta_fields=["method", "block_size", "kernel_shape", "orig_dtype", "pad"],
)


# ----------------------------------------------------------------------------------------------------------
# Host side: quantize one tensor with numpy.


def quantize(
    w: np.ndarray, method: str, block_size: int | None = None, name: str = ""
) -> "QuantizedTensor | np.ndarray":
    """Quantize one kernel `w [..., in, out]` (float32/bfloat16/float16) on the host.

    method: "int8" (symmetric absmax; per output column over all of `in` when `block_size` is None, else per
    block of `block_size` rows), "nf4" (block_size default 64; `in` is zero-padded to a multiple of 64 when
    the default is used), "mxfp4" (blocks of 32, block_size None or 32; `in` zero-padded to a multiple of
    32) or "none" (returns `w` unchanged).
    Returns a `QuantizedTensor` whose leaves are numpy arrays (the loader device_puts them; jnp code also
    accepts them as they are). Works slice by slice over the leading dims, so host memory peaks near the
    input, the output and one float32 slice. `name` only labels errors.
    Raises UserError for an unknown method, or an explicit block size that does not divide `in`.
    """
    if method not in METHODS:
        raise UserError(
            f"quantization method {method!r} for {name or 'tensor'}: choose one of {', '.join(METHODS)}"
        )
    if method == "none":
        return w
    w = np.asarray(w)
    label = f"{name or 'tensor'} {list(w.shape)}"
    if w.ndim < 2 or not (np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16):
        raise UserError(f"cannot quantize {label} of dtype {w.dtype}: need a float kernel [..., in, out]")
    n_in = w.shape[-2]
    if method == "mxfp4":
        mxfp4.check_block_size(block_size)
        codes, scales, pad = mxfp4.encode(w)
        return _mxfp4_tensor(codes, scales, (n_in, w.shape[-1]), w.dtype.name, pad)
    if block_size is not None:
        alternative = "or block_size=None for one scale per output column"
        if method == "nf4":
            alternative = f"or leave the block size unset for {NF4_BLOCK} with zero padding"
        _check_block(int(block_size), n_in, label, alternative)
    if method == "int8":
        return _quantize_int8(w, block_size)
    return _quantize_nf4(w, block_size, label)


def _quantize_int8(w: np.ndarray, block_size: int | None) -> QuantizedTensor:
    """int8 absmax of a checked kernel `w [..., in, out]`, one [in, out] slice at a time."""
    n_in, n_out = w.shape[-2:]
    lead = w.shape[:-2]
    bs = n_in if block_size is None else int(block_size)
    data = np.empty(w.shape, np.int8)
    scale = np.empty(lead + (n_in // bs, n_out), np.float32)
    for idx in np.ndindex(*lead):
        data[idx], scale[idx] = _int8_slice(np.ascontiguousarray(w[idx], np.float32), bs)
    return QuantizedTensor(
        data,
        scale=scale,
        method="int8",
        block_size=bs,
        kernel_shape=(n_in, n_out),
        orig_dtype=w.dtype.name,
    )


def _quantize_nf4(w: np.ndarray, block_size: int | None, label: str) -> QuantizedTensor:
    """NF4 with double-quantized scales of a checked kernel `w [..., in, out]`, one slice at a time; `in`
    zero-padded to a multiple of the default block when `block_size` is None."""
    n_in, n_out = w.shape[-2:]
    lead = w.shape[:-2]
    bs = NF4_BLOCK if block_size is None else int(block_size)
    if bs % 2:
        raise UserError(f"nf4 block size {bs} for {label} must be even (two 4-bit codes per byte)")
    pad = -n_in % bs  # 0 unless the default block is used (an explicit one was checked above)
    n_pad = n_in + pad
    n_scales = n_pad // bs * n_out
    n_groups = -(-n_scales // SCALE_GROUP)
    data = np.empty(lead + (n_pad // 2, n_out), np.uint8)
    codes = np.empty(lead + (n_groups, SCALE_GROUP), np.int8)
    gmax = np.empty(lead + (n_groups,), np.float32)
    mean = np.empty(lead + (1,), np.float32)
    buf = np.zeros((n_pad, n_out), np.float32) if pad else None  # zero rows stay zero across slices
    for idx in np.ndindex(*lead):
        if buf is None:
            x = np.ascontiguousarray(w[idx], np.float32)
        else:
            buf[:n_in] = w[idx]
            x = buf
        data[idx], absmax = _nf4_slice(x, bs)
        codes[idx], gmax[idx], mean[idx] = _double_quant(absmax.reshape(-1), n_groups)
    return QuantizedTensor(
        data,
        scale_codes=codes,
        scale_absmax=gmax,
        scale_mean=mean,
        method="nf4",
        block_size=bs,
        kernel_shape=(n_in, n_out),
        orig_dtype=w.dtype.name,
        pad=pad,
    )


def from_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "") -> QuantizedTensor:
    """The mxfp4 base's kernel [*P, G * 32, R] from a checkpoint's MXFP4 pair, blocks uint8 [*P, R, G, 16]
    and scales uint8 [*P, R, G], codes and scales kept bit for bit (`jaxlora.quant.mxfp4.packed_kernel`)."""
    codes, s = mxfp4.packed_kernel(blocks, scales, name)
    return _mxfp4_tensor(codes, s, (codes.shape[-2] * 2, codes.shape[-1]), "float32", 0)


def _mxfp4_tensor(codes, scales, kernel: tuple[int, int], orig_dtype: str, pad: int) -> QuantizedTensor:
    return QuantizedTensor(
        codes,
        scale=scales,
        method="mxfp4",
        block_size=mxfp4.BLOCK,
        kernel_shape=(int(kernel[0]), int(kernel[1])),
        orig_dtype=orig_dtype,
        pad=pad,
    )


def _check_block(bs: int, n_in: int, label: str, alternative: str) -> None:
    if bs > 0 and n_in % bs == 0:
        return
    divs = [d for d in range(1, n_in + 1) if n_in % d == 0]
    near = sorted(divs, key=lambda d: (abs(d - bs), d))[:4]
    raise UserError(
        f"block size {bs} does not divide the input dim {n_in} of {label}: "
        f"use a divisor such as {', '.join(map(str, sorted(near)))}, {alternative}"
    )


def _chunks(n_blocks: int, bs: int, n_out: int):
    """Yield block ranges (b0, b1) of roughly _CHUNK elements (at least one block)."""
    step = max(1, _CHUNK // (bs * n_out))
    for b0 in range(0, n_blocks, step):
        yield b0, min(b0 + step, n_blocks)


def _absmax(xb: np.ndarray) -> np.ndarray:
    """Absmax over axis 1 of [nb, bs, out] without an |x| temporary -> [nb, out]."""
    return np.maximum(xb.max(axis=1), -xb.min(axis=1))


def _int8_slice(x: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """x f32 [in, out] -> (int8 [in, out], scale f32 [in // bs, out])."""
    n_in, n_out = x.shape
    xb = x.reshape(n_in // bs, bs, n_out)
    scale = _absmax(xb) / 127
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)  # all-zero blocks -> code 0
    q = np.empty(xb.shape, np.int8)
    if n_in // bs == 1:  # per-channel: one scale row, chunk along rows instead of blocks
        rows = max(1, _CHUNK // n_out)
        for r0 in range(0, bs, rows):
            q[0, r0 : r0 + rows] = np.rint(xb[0, r0 : r0 + rows] * inv[0])
    else:
        for b0, b1 in _chunks(n_in // bs, bs, n_out):
            q[b0:b1] = np.rint(xb[b0:b1] * inv[b0:b1, None, :])
    return q.reshape(n_in, n_out), scale


def _nf4_slice(x: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """x f32 [in, out] -> (packed uint8 [in // 2, out], block absmax f32 [in // bs, out])."""
    n_in, n_out = x.shape
    xb = x.reshape(n_in // bs, bs, n_out)
    absmax = _absmax(xb)
    inv = np.divide(1.0, absmax, out=np.zeros_like(absmax), where=absmax > 0)
    packed = np.empty((n_in // 2, n_out), np.uint8)
    for b0, b1 in _chunks(n_in // bs, bs, n_out):
        codes = nf4_codes(xb[b0:b1] * inv[b0:b1, None, :])
        packed[b0 * bs // 2 : b1 * bs // 2] = pack_nf4(codes.reshape(-1, n_out))
    return packed, absmax


def nf4_codes(y: np.ndarray) -> np.ndarray:
    """Nearest NF4 code (uint8 0..15) of each value of `y` (already divided by its block absmax).

    The code is the number of decision thresholds (midpoints between neighbouring codes) below y, counted
    with 15 vectorized comparisons: ~10x faster than `np.searchsorted`, which gives the same result.
    """
    code = np.zeros(y.shape, np.uint8)
    above = np.empty(y.shape, bool)
    for t in _NF4_MID:
        np.greater(y, t, out=above)
        code += above
    return code


def _double_quant(s: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block scales s f32 [n] -> (int8 [n_groups, 256], group absmax f32 [n_groups], mean f32 [1])."""
    mean = np.float32(s.mean(dtype=np.float64))
    c = np.zeros(n_groups * SCALE_GROUP, np.float32)
    c[: s.size] = s - mean  # padding stays 0 after centring
    c = c.reshape(n_groups, SCALE_GROUP)
    gmax = np.abs(c).max(axis=1)
    inv = np.divide(127.0, gmax, out=np.zeros_like(gmax), where=gmax > 0)
    return np.rint(c * inv[:, None]).astype(np.int8), gmax, np.array([mean], np.float32)


def pack_nf4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes uint8 [..., 2k, out] (values 0..15) -> bytes uint8 [..., k, out]; row 2i low, 2i+1 high."""
    c = codes.reshape(codes.shape[:-2] + (codes.shape[-2] // 2, 2, codes.shape[-1]))
    return (c[..., 0, :] | (c[..., 1, :] << 4)).astype(np.uint8)


def unpack_nf4(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_nf4`, in jnp: uint8 [..., k, out] -> codes uint8 [..., 2k, out]."""
    p = jnp.asarray(packed)
    c = jnp.stack([p & 0xF, p >> 4], axis=-2)  # [..., k, 2, out]
    return c.reshape(p.shape[:-2] + (2 * p.shape[-2], p.shape[-1]))


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def nbytes(tree) -> int:
    """Bytes of all array leaves of `tree` (numpy, jax, or `jax.ShapeDtypeStruct`), quantized or not.

    Logical bytes of one copy: a replicated or sharded jax array counts once, not per device.
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total


def human_bytes(b: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b} B"
