"""The model spec, derived from the family registry (`models.families`) and its weight tables
(`models.weights`): nothing here names a family.

    name_table(cfg)       the tensors the loader reads, the merged saver writes and random init fills
    hf_shape(entry, cfg)  the shape HF stores (a torch `Linear` is [out, in]; jaxlora keeps [in, out])
    logical_axes()        params path -> logical axes, the input of `jaxlora.parallel.rules`
    dropout_stream(...)   the random stream of a LoRA target's dropout masks
    models.targets        the linear layers and MoE weights LoRA can target, their dims and PEFT names
    models.checkpoint_names  tensors no entry reads; a multimodal checkpoint's text-tower names

The weight facts (`Entry`, the layouts, `quantized`) are defined in `models.weights` and named here too,
so that code reading the spec has one module to import.
"""

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.families import FAMILIES, Family, family
from jaxlora.models.hybrid_weights import layer_ids, stack_rows
from jaxlora.models.weights import (
    CONV1D,
    DEPTHWISE,
    EMBEDDING,
    EXPERTS,
    LAYER,
    LINEAR,
    VECTOR,
    Entry,
    checkpoint_names,
    hf_shape,
    part_shape,
    quantized,
)

__all__ = [
    "CONV1D",
    "DEPTHWISE",
    "EMBEDDING",
    "EXPERTS",
    "LAYER",
    "LINEAR",
    "VECTOR",
    "Entry",
    "Family",
    "checkpoint_names",
    "dropout_stream",
    "family",
    "hf_shape",
    "layer_ids",
    "logical_axes",
    "name_table",
    "part_shape",
    "quantized",
    "stack_rows",
]


def name_table(cfg: DecoderConfig) -> list[Entry]:
    """Every tensor of the HF checkpoint for this config, in checkpoint order."""
    return [e for e in family(cfg).weights if e.present(cfg)]


def dropout_stream(cfg: DecoderConfig, group: str, name: str) -> int:
    """The stream of the LoRA dropout masks of the linear `name` in `group`: fold_in(layer key, stream)."""
    return family(cfg).dropout_streams[group, name]


def logical_axes() -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Params path -> logical axes of its dims, over every family. One path is one kind of weight for the
    one decoder, so families must agree on its axes (checked)."""
    table: dict[tuple[str, ...], tuple[str | None, ...]] = {}
    for fam in FAMILIES.values():
        for e in fam.weights:
            if table.setdefault(e.path, e.axes) != e.axes:
                raise AssertionError(f"families disagree on the logical axes of {'.'.join(e.path)}")
    return table
