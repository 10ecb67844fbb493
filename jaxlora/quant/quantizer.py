"""The loader's quantizer hook: which linear kernels to quantize, and how (`make_quantizer`)."""

import dataclasses

import numpy as np

from jaxlora.errors import UserError
from jaxlora.quant.tensor import METHODS, QuantizedTensor, from_mxfp4, quantize


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """The loader's quantizer hook (`jaxlora.models.loading.Quantizer`); build it with `make_quantizer`.

    Called as `quantizer(name, w)` with the HF tensor name of a linear weight (the layer template with
    `{i}` for a per-layer one, e.g. `model.layers.{i}.mlp.down_proj.weight`) and its float32 host array
    (`[in, out]`, one layer at a time; `[D, V]` for an untied LM head). Returns a `QuantizedTensor`, or None
    to keep the tensor in float (the loader then stores it in the model dtype). The loader asks
    `wants(name)` first, so a skipped tensor is never copied to float32.
    """

    method: str
    block_size: int | None = None
    skip: tuple[str, ...] = ("lm_head", "embed_tokens")

    def wants(self, name: str) -> bool:
        """False when the HF tensor name (template, `{i}` for the layer) contains a `skip` string."""
        return not any(s in name for s in self.skip)

    def __call__(self, name: str, w: np.ndarray) -> "QuantizedTensor | None":
        if not self.wants(name):
            return None
        return quantize(w, self.method, self.block_size, name=name.replace("{i}", "*"))

    def keeps_mxfp4(self, name: str) -> bool:
        """Whether a tensor the checkpoint stores as MXFP4 is kept as it is (`from_mxfp4`, no float round
        trip): with method "mxfp4", unless skipped. The loader asks only where the blocks run along the
        kernel's `in` (gpt-oss's experts); elsewhere it dequantizes and calls the quantizer."""
        return self.method == "mxfp4" and self.wants(name)

    def from_mxfp4(self, name: str, blocks: np.ndarray, scales: np.ndarray) -> QuantizedTensor:
        """One layer's checkpoint pair, blocks [*P, R, G, 16] and scales [*P, R, G], as the base's kernel
        [*P, G * 32, R] (`jaxlora.quant.tensor.from_mxfp4`)."""
        return from_mxfp4(blocks, scales, name.replace("{i}", "*"))


def make_quantizer(
    weights: str, block_size: int | None = None, skip: tuple[str, ...] = ("lm_head", "embed_tokens")
) -> "WeightQuantizer | None":
    """The quantizer for `load_model(..., quantizer=...)`, from the `quant:` config section.

    weights: "none" (returns None: load in float), "int8", "nf4" or "mxfp4" (a checkpoint's MXFP4 tensors
    kept as they are, see `keeps_mxfp4`). block_size: values per scale (None = one scale per output column
    for int8, 64 with zero padding of `in` for nf4, always 32 for mxfp4); an explicit size must divide the
    input dim of every quantized kernel (UserError naming the tensor otherwise). skip: HF
    module names (`lm_head`, `down_proj`) or substrings of HF tensor names (`layers.{i}.mlp`) left in float;
    per-layer tensors are matched by their template with `{i}`, so a skip applies to all layers.
    Every per-layer linear kernel and an untied LM head is quantized unless skipped; embeddings, norms and
    biases never are (they are not linear kernels). Example:

        model = load_model(path, quantizer=make_quantizer("nf4"))

    The config validates all three; `weights` and `block_size` are checked here too because the export
    and generation entry points also take them from command-line arguments.
    """
    if weights not in METHODS:
        raise UserError(
            f"unknown quantization {weights!r} (quant.weights): choose one of {', '.join(METHODS)}"
        )
    if block_size is not None and (isinstance(block_size, bool) or int(block_size) < 1):
        raise UserError(f"quant.block_size must be a positive integer or null, got {block_size!r}")
    if weights == "none":
        return None
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    return WeightQuantizer(weights, None if block_size is None else int(block_size), skip)
