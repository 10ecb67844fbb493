"""LoRA adapters on the frozen decoder: targets, init, scaling, merge (see `adapters`)."""

from jaxlora.lora.adapters import (
    ALL_LINEAR,
    INITS,
    LoraConfig,
    count_params,
    init_lora,
    layer_mask,
    lora_scale,
    matching_paths,
    merge,
    scaling,
    target_paths,
    unmerge,
)

__all__ = [
    "ALL_LINEAR",
    "INITS",
    "LoraConfig",
    "count_params",
    "init_lora",
    "layer_mask",
    "lora_scale",
    "matching_paths",
    "merge",
    "scaling",
    "target_paths",
    "unmerge",
]
