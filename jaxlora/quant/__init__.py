"""Frozen base weights in int8, NF4 or MXFP4, and the matmul that reads them (QLoRA's storage, for XLA).

`tensor` holds the storage (`QuantizedTensor`, `quantize`, the NF4 code and its packing; the layouts are
documented there), `quantizer` the loader's hook (`make_quantizer`), `matmul` the device side
(`dequantize`, `qmatmul`) and `memory` the byte and weight counts; `mxfp4` decodes the MXFP4 expert
weights of gpt-oss checkpoints (dequantized, or kept as they are by an mxfp4 base) and encodes kernels to
MXFP4. A leaf of the package: it imports only `jaxlora.errors`.
"""

from jaxlora.quant.matmul import as_kernel, dequantize, dequantize_params, qmatmul
from jaxlora.quant.memory import count_params, format_memory_report, memory_report
from jaxlora.quant.quantizer import WeightQuantizer, make_quantizer
from jaxlora.quant.tensor import (
    METHODS,
    NF4_BLOCK,
    NF4_CODE,
    SCALE_GROUP,
    QuantizedTensor,
    nbytes,
    nf4_code_values,
    nf4_codes,
    pack_nf4,
    quantize,
    unpack_nf4,
)

__all__ = [
    "METHODS",
    "NF4_BLOCK",
    "NF4_CODE",
    "SCALE_GROUP",
    "QuantizedTensor",
    "WeightQuantizer",
    "as_kernel",
    "count_params",
    "dequantize",
    "dequantize_params",
    "format_memory_report",
    "make_quantizer",
    "memory_report",
    "nbytes",
    "nf4_code_values",
    "nf4_codes",
    "pack_nf4",
    "qmatmul",
    "quantize",
    "unpack_nf4",
]
