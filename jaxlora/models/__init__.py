"""Flax/JAX decoders that load Hugging Face checkpoints: Llama, Mistral, Qwen2, Qwen3, GPT-2."""

from jaxlora.models.config import SUPPORTED_MODEL_TYPES, DecoderConfig, config_from_hf
from jaxlora.models.decoder import forward, logits_from_hidden
from jaxlora.models.loading import Model, load_model, load_tokenizer, resolve_model_path

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "Model",
    "config_from_hf",
    "forward",
    "load_model",
    "load_tokenizer",
    "logits_from_hidden",
    "resolve_model_path",
]
