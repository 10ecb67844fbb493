"""MXFP4 (OCP microscaling, e2m1 values with a shared e8m0 scale per 32): gpt-oss's checkpoint tensors
(`X_blocks`, `X_scales`) dequantized on the host as transformers loads them, and the host side of the
`mxfp4` frozen base (`quant.weights: mxfp4`, `QuantizedTensor` method "mxfp4").

gpt-oss checkpoints store their MoE expert weights in MXFP4: blocks of 32 values share one power-of-two
scale, and each value is a 4-bit float (e2m1: sign, 2 exponent bits, 1 mantissa bit, the 16 values of
`FP4_E2M1`). In the safetensors file a tensor `X` becomes

    X_blocks  uint8 [*P, R, G, 16]  two codes per byte: value 2k in the low nibble, 2k + 1 in the high one
    X_scales  uint8 [*P, R, G]      e8m0 exponents with bias 127: the block's scale is 2 ** (s - 127)

and dequantizes to `[*P, G * 32, R]`: the `[*P, R, G * 32]` values with the last two axes swapped, the
layout transformers' `convert_moe_packed_tensors` returns. For gpt-oss (`GptOssExperts`, E experts,
hidden D, expert width F) that is `gate_up_proj` [E, D, 2F] from blocks [E, 2F, D / 32, 16] and
`down_proj` [E, F, D] from blocks [E, D, F / 32, 16]: jaxlora's kernel layout [..., in, out], with the
blocks running along `in`.

The mxfp4 base keeps such tensors as they are (`packed_kernel`): codes and scales are only transposed to
[..., in / 2, out] and [..., in / 32, out], the byte pairs untouched (a byte holds rows 2k and 2k + 1 of
`in`, as NF4's packing does), so no value is rounded again. Other kernels are quantized by `encode`,
following the OCP MX spec v1.0 (sec. 6.3): the block's shared exponent is floor(log2(amax)) - 2 (2 is
e2m1's largest exponent), clamped to e8m0's [-127, 127], and each value divided by 2 ** exponent rounds
to the nearest e2m1 value, ties to even, saturating at +-6. (triton_kernels' `downcast_to_mxfp`, which
transformers' MXFP4 quantizer calls, rounds the scale up by default instead, so no value saturates.)

Hand-written because no maintained JAX or numpy library reads MXFP4 (transformers' own dequantization is
torch code, and its quantizer needs a Triton kernel from the hub). It is a table look-up and a scale.
"""

import numpy as np

from jaxlora.errors import UserError

# The 16 e2m1 values by 4-bit code (bit 3 is the sign).
FP4_E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
BLOCK = 32  # values per scale
SCALE_BIAS = 127
# One byte -> its two values (low nibble first), and one e8m0 scale byte -> 2 ** (s - 127) in float32
# (2 ** 128, the byte 255, is inf, as in transformers' `torch.ldexp`).
_PAIRS = np.stack([FP4_E2M1[np.arange(256) & 0x0F], FP4_E2M1[np.arange(256) >> 4]], axis=-1)
with np.errstate(over="ignore"):
    POW2 = np.exp2(np.arange(256, dtype=np.float64) - SCALE_BIAS).astype(np.float32)


def mxfp4_shape(blocks_shape, scales_shape, name: str = "") -> tuple[int, ...]:
    """The dequantized shape `[*P, G * 32, R]` of blocks `[*P, R, G, 16]` with scales `[*P, R, G]`.

    A pair that does not fit is refused in one line naming the tensor (`name`: the dequantized one, X).
    """
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK // 2 or blocks_shape[:-1] != scales_shape:
        raise UserError(
            f"MXFP4 tensor {name}: {name}_blocks {list(blocks_shape)} and {name}_scales {list(scales_shape)} "
            f"do not fit (blocks [..., R, G, {BLOCK // 2}] with scales [..., R, G]); "
            "download or save the checkpoint again"
        )
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK, rows)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "") -> np.ndarray:
    """float32 `[*P, G * 32, R]` from uint8 blocks `[*P, R, G, 16]` and scales `[*P, R, G]` (see above).

    Equal, bit for bit, to transformers' `convert_moe_packed_tensors(blocks, scales, dtype=float32)`. The
    result is C-contiguous and the only large allocation: the values are decoded one leading index (one
    expert) at a time and written transposed, so host memory holds one float32 copy of the tensor (plus
    one expert's worth), and the blocks can stay memory-mapped.
    """
    shape = mxfp4_shape(blocks.shape, scales.shape, name)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise UserError(
            f"MXFP4 tensor {name}: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    *prefix, rows, groups, half = blocks.shape
    out = np.empty(shape, np.float32)
    flat_out = out.reshape(-1, groups * BLOCK, rows)
    flat_blocks = blocks.reshape(-1, rows, groups, half)
    flat_scales = scales.reshape(-1, rows, groups)
    for k in range(flat_out.shape[0]):
        vals = np.take(_PAIRS, flat_blocks[k], axis=0).reshape(rows, groups, BLOCK)  # [R, G, 32]
        with np.errstate(over="ignore", invalid="ignore"):  # inf and nan as transformers gives them
            vals *= POW2[flat_scales[k]][:, :, None]
        _transpose_into(flat_out[k], vals.reshape(rows, groups * BLOCK))
    return out


def _transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst [C, R] = src [R, C].T, tile by tile (a plain strided copy is about 4x slower at gpt-oss sizes)."""
    rows, cols = src.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            dst[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T


# ----------------------------------------------------------------------------------------------------------
# The mxfp4 base: a kernel [..., in, out] as codes uint8 [..., in / 2, out], scales uint8 [..., in / 32, out].

# e2m1 magnitudes by code 0..7 and the decision points between neighbours; at a tie the even code wins
# (round to nearest even), so the comparison is `>` below an even code and `>=` below an odd one.
_MIDS = (FP4_E2M1[1:8] + FP4_E2M1[:7]) / 2  # [7]: 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
_CHUNK = 1 << 21  # elements per host-side work chunk (bounds numpy temporaries)


def check_block_size(block_size) -> None:
    """MXFP4's block is fixed: a `quant.block_size` other than null or 32 is refused in one line."""
    if block_size is not None and int(block_size) != BLOCK:
        raise UserError(
            f"mxfp4 has blocks of {BLOCK} values: set quant.block_size to null (or {BLOCK}), not {block_size}"
        )


def packed_kernel(blocks: np.ndarray, scales: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's pair as the mxfp4 base stores it, bit for bit: blocks [*P, R, G, 16] and scales
    [*P, R, G] (dequantizing to the kernel [*P, G * 32, R]) -> codes uint8 [*P, G * 16, R] and scales uint8
    [*P, G, R], both C-contiguous: a transpose of whole bytes, no value decoded."""
    mxfp4_shape(blocks.shape, scales.shape, name)
    *prefix, rows, groups, half = blocks.shape
    codes = np.asarray(blocks, np.uint8).reshape(*prefix, rows, groups * half)
    return np.ascontiguousarray(np.swapaxes(codes, -1, -2)), np.ascontiguousarray(np.swapaxes(scales, -1, -2))


def encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize a float kernel w [..., in, out] to MXFP4 by the OCP MX rule (module docstring).

    Returns (codes uint8 [..., P / 2, out], scales uint8 [..., P / 32, out], pad), P = in zero-padded to a
    multiple of 32 (pad = P - in rows; zero rows cost nothing: they encode exactly as 0). Works one block
    row chunk of one slice at a time, so temporaries stay small.
    """
    n_in, n_out = w.shape[-2:]
    lead = w.shape[:-2]
    pad = -n_in % BLOCK
    n_pad = n_in + pad
    codes = np.empty(lead + (n_pad // 2, n_out), np.uint8)
    scales = np.empty(lead + (n_pad // BLOCK, n_out), np.uint8)
    step = max(1, _CHUNK // (BLOCK * n_out))  # blocks per chunk
    for idx in np.ndindex(*lead):
        x = np.zeros((n_pad, n_out), np.float32)
        x[:n_in] = w[idx]
        xb = x.reshape(n_pad // BLOCK, BLOCK, n_out)
        for b0 in range(0, n_pad // BLOCK, step):
            c, s = _encode_blocks(xb[b0 : b0 + step])
            codes[idx][b0 * BLOCK // 2 : (b0 + step) * BLOCK // 2] = c
            scales[idx][b0 : b0 + step] = s
    return codes, scales, pad


def _encode_blocks(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xb f32 [nb, 32, out] -> (packed codes uint8 [nb * 16, out], e8m0 scales uint8 [nb, out])."""
    amax = np.maximum(xb.max(axis=1), -xb.min(axis=1))  # [nb, out]
    _, e = np.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1 (exact)
    shared = np.where(amax > 0, e - 1 - 2, -SCALE_BIAS).clip(-SCALE_BIAS, SCALE_BIAS)
    y = np.ldexp(xb, -shared[:, None, :].astype(np.int32))  # exact: a power-of-two scaling
    mag = np.abs(y)
    code = np.zeros(y.shape, np.uint8)
    for k, t in enumerate(_MIDS):
        code += (mag >= t) if k % 2 else (mag > t)  # k odd: the code above (k + 1) is even
    code |= np.signbit(y).astype(np.uint8) << 3
    code = code.reshape(-1, code.shape[-1])  # [nb * 32, out]
    return code[0::2] | (code[1::2] << 4), (shared + SCALE_BIAS).astype(np.uint8)
