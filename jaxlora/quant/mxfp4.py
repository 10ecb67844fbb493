"""MXFP4 checkpoint tensors (`X_blocks`, `X_scales`) dequantized on the host, as transformers loads them.

gpt-oss checkpoints store their MoE expert weights in the OCP microscaling format MXFP4: blocks of 32
values share one power-of-two scale, and each value is a 4-bit float (e2m1: sign, 2 exponent bits, 1
mantissa bit, the 16 values of `FP4_E2M1`). In the safetensors file a tensor `X` becomes

    X_blocks  uint8 [*P, R, G, 16]  two codes per byte: value 2k in the low nibble, 2k + 1 in the high one
    X_scales  uint8 [*P, R, G]      e8m0 exponents with bias 127: the block's scale is 2 ** (s - 127)

and dequantizes to `[*P, G * 32, R]`: the `[*P, R, G * 32]` values with the last two axes swapped, the
layout transformers' `convert_moe_packed_tensors` returns. For gpt-oss (`GptOssExperts`, E experts,
hidden D, expert width F) that is `gate_up_proj` [E, D, 2F] from blocks [E, 2F, D / 32, 16] and
`down_proj` [E, F, D] from blocks [E, D, F / 32, 16].

Hand-written because no maintained JAX or numpy library reads MXFP4 (transformers' own dequantization is
torch code, and its quantizer needs a Triton kernel from the hub). It is a table look-up and a scale, so
numpy does it on the host while loading, one tensor at a time, before any `quant.weights` quantization.
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
    _POW2 = np.exp2(np.arange(256, dtype=np.float64) - SCALE_BIAS).astype(np.float32)


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
            vals *= _POW2[flat_scales[k]][:, :, None]
        _transpose_into(flat_out[k], vals.reshape(rows, groups * BLOCK))
    return out


def _transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst [C, R] = src [R, C].T, tile by tile (a plain strided copy is about 4x slower at gpt-oss sizes)."""
    rows, cols = src.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            dst[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T
