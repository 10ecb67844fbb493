"""jaxlora: LoRA fine-tuning of Hugging Face decoder LLMs in JAX/Flax, with PEFT-compatible adapters."""

from jaxlora.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
