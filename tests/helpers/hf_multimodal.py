"""Tiny random multimodal checkpoints (`*ForConditionalGeneration`, a text tower jaxlora trains beside a
vision tower it does not) built with transformers, and their text-only logits in PyTorch."""

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from tests.helpers.hf_gemma4 import make_hf_gemma4
from tests.helpers.hf_tiny import make_hf_gemma3, make_hf_qwen3_5, make_hf_qwen3_5_moe

# multimodal model_type -> builder(folder) -> the saved torch model (models.families.TEXT_TOWERS)
BUILDERS = {
    "gemma3": make_hf_gemma3,
    "qwen3_5": make_hf_qwen3_5,
    "qwen3_5_moe": make_hf_qwen3_5_moe,
    "gemma4": make_hf_gemma4,
}


def hf_class(folder: Path):
    """The transformers class config.json's `architectures` names (Gemma3ForConditionalGeneration)."""
    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def load_hf(folder: Path, check: bool = True):
    """The checkpoint in `folder` as its own class, eval mode; with `check`, asserting that no tensor was
    missing, unexpected or of another shape."""
    model, info = hf_class(folder).from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not check or not any(info.values()), info
    return model.eval()


def text_logits(model, ids: np.ndarray) -> np.ndarray:
    """[B, T, V] float32 logits of token ids alone (no pixels) through a torch multimodal model."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def multimodal_cache(tmp_path_factory):
    """For a module-scoped fixture: `get(model_type)` -> (folder, jaxlora Model of its text tower), the
    checkpoint built and loaded once."""
    from jaxlora.models import load_model

    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            BUILDERS[model_type](folder)
            cache[model_type] = (folder, load_model(folder))
        return cache[model_type]

    return get
