"""Flax/JAX decoders that load Hugging Face checkpoints of every family in `models.families.FAMILIES`."""

from jaxlora.models.config import SUPPORTED_MODEL_TYPES, DecoderConfig, ModelSource, Runtime, config_from_hf
from jaxlora.models.decoder import forward, logits_from_hidden
from jaxlora.models.loading import Model, load_model, load_tokenizer, model_source, resolve_model_path

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "Model",
    "ModelSource",
    "Runtime",
    "config_from_hf",
    "forward",
    "load_model",
    "load_tokenizer",
    "logits_from_hidden",
    "model_source",
    "resolve_model_path",
]
