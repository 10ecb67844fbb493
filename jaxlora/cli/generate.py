"""`run_generation`: what `scripts/generate.py` does, as a library function.

(`jaxlora.models.generate` is the decoding itself; this module adds loading, adapters and argument checks.)
"""

import dataclasses

from jaxlora.errors import UserError
from jaxlora.lora import lora_scale
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models import load_model, load_tokenizer
from jaxlora.models.generate import generate_text
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import make_quantizer


def run_generation(
    model: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    adapter: str | None = None,
    quant: str = "none",
    allow_pickle: bool = False,
) -> list[str]:
    """Load a model (and optionally a PEFT adapter), generate for each prompt, return the new text.

    quant: "none", "int8" or "nf4" quantizes the base's linear weights while loading (`make_quantizer`).
    """
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    quantizer = make_quantizer(quant)  # None for "none"; UserError for an unknown method
    m = load_model(model, dtype=dtype, allow_pickle=allow_pickle, quantizer=quantizer)
    tokenizer = load_tokenizer(m.path)
    lora, scale = None, 1.0
    if adapter is not None:
        lora, lora_cfg = load_peft_adapter(adapter, m.config)
        scale = lora_scale(m.config, lora_cfg)
        params, lora = with_embeddings(m.params, lora)  # trainable tokens / modules_to_save, if any
        m = dataclasses.replace(m, params=params)
    return generate_text(
        m,
        tokenizer,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        lora=lora,
        lora_scale=scale,
    )
