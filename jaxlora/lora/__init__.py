"""LoRA adapters on the frozen decoder: targets and scaling (`adapters`), init (`init`), what trains
(`trainable`), merging (`merge`)."""

from jaxlora.lora.adapters import (
    ALL_LINEAR,
    INITS,
    layer_mask,
    lora_scale,
    matching_paths,
    scaling,
    target_paths,
)
from jaxlora.lora.config import LoraConfig
from jaxlora.lora.init import init_lora
from jaxlora.lora.merge import merge, merge_kernel, save_merged, unmerge
from jaxlora.lora.trainable import Adapter
from jaxlora.quant import count_params  # the package's one parameter counter

__all__ = [
    "ALL_LINEAR",
    "Adapter",
    "INITS",
    "LoraConfig",
    "count_params",
    "init_lora",
    "layer_mask",
    "lora_scale",
    "matching_paths",
    "merge",
    "merge_kernel",
    "save_merged",
    "scaling",
    "target_paths",
    "unmerge",
]
