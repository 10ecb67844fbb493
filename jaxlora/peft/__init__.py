"""Adapters in PEFT's format, in and out: the LoRA tensors and `adapter_config.json` (`adapter`), the
folder and its config checked (`folder`), the embedding side of the file (`embeddings`: trainable tokens,
modules_to_save copies, a resized vocabulary) and MoE experts as PEFT `target_parameters` (`experts`)."""

from jaxlora.peft.adapter import load_peft_adapter, read_adapter_config, save_peft_adapter

__all__ = ["load_peft_adapter", "read_adapter_config", "save_peft_adapter"]
