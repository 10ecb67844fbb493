"""Which tensors of a checkpoint the model reads: those no spec entry explains (`unexpected_tensors`), and a
multimodal checkpoint's text-tower names mapped to the decoder's (`text_tower_names`, `spec_name`) and back
(`tower_name`), its other towers' tensors apart (`other_tower_names`)."""

import re
from collections.abc import Iterable

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.spec import checkpoint_names, family, layer_ids, name_table


def unexpected_tensors(cfg: DecoderConfig, names: Iterable[str]) -> list[str]:
    """The checkpoint tensors in `names` that no entry reads, less the family's known buffers and the LM
    head a tied model does not use (some tied checkpoints still carry it)."""
    fam = family(cfg)
    expected = {
        n
        for e in name_table(cfg)
        for i in (layer_ids(e, cfg) if e.per_layer else [None])
        for n in checkpoint_names(e, cfg, i)
    }
    skip = [re.compile(p) for p in fam.buffers]
    if cfg.tie_word_embeddings:
        skip += [re.compile(re.escape(e.hf)) for e in fam.weights if e.path == ("lm_head", "kernel")]
    return [n for n in names if n not in expected and not any(p.fullmatch(n) for p in skip)]


# Multimodal checkpoints (families.TEXT_TOWERS) hold the decoder as a text tower: the hub and transformers'
# save_pretrained name it `language_model.model.*` / `language_model.lm_head.*`, transformers 5 in memory
# (and PEFT's adapters) `model.language_model.*` / `lm_head.*`. Every other tensor (the vision and audio
# towers, the projectors, a multi-token-prediction head) is no part of the decoder.
_TOWER_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_TEXT = ("language_model.", "model.language_model.", "lm_head.")
TOWER_MODULES = "model.language_model."  # where transformers 5 puts the decoder's `model.*` modules


def is_text_tower(name: str) -> bool:
    """Whether a multimodal checkpoint's tensor (or module) `name` belongs to its text tower."""
    return name.startswith(_TEXT) or name == "lm_head"


def spec_name(name: str) -> str | None:
    """A multimodal checkpoint's (or PEFT module's) text-tower `name` under the spec's names (`model.*`,
    `lm_head.*`), in either naming; None for another tower's, `name` itself for one of neither form."""
    if not is_text_tower(name):
        return None
    for prefix, ours in _TOWER_PREFIXES:
        if name.startswith(prefix):
            return ours + name.removeprefix(prefix)
    return name


def tower_name(name: str) -> str:
    """The spec's `name` (`model.layers.0.self_attn.q_proj`) as transformers 5 names it in a multimodal
    model (`model.language_model.layers.0.self_attn.q_proj`); `lm_head.*` is the same in both."""
    return TOWER_MODULES + name.removeprefix("model.") if name.startswith("model.") else name


def text_tower_names(names: Iterable[str]) -> dict[str, str]:
    """The spec's name -> the checkpoint's name for the tensors of a multimodal checkpoint's text tower;
    other towers' tensors are left out, text-tower names of neither form kept as they are (so the loader
    reports them)."""
    return {spec: name for name in names if (spec := spec_name(name)) is not None}


def other_tower_names(names: Iterable[str]) -> list[str]:
    """The tensors of a multimodal checkpoint outside its text tower (vision, audio, projectors)."""
    return [name for name in names if not is_text_tower(name)]
