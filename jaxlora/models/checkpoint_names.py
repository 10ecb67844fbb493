"""Which tensors of a checkpoint the model reads: those no spec entry explains (`unexpected_tensors`), and a
multimodal checkpoint's text-tower names mapped to the decoder's (`text_tower_names`)."""

import re
from collections.abc import Iterable

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.spec import checkpoint_names, family, name_table


def unexpected_tensors(cfg: DecoderConfig, names: Iterable[str]) -> list[str]:
    """The checkpoint tensors in `names` that no entry reads, less the family's known buffers and the LM
    head a tied model does not use (some tied checkpoints still carry it)."""
    fam = family(cfg)
    layers = range(cfg.num_layers)
    expected = {
        n
        for e in name_table(cfg)
        for i in (layers if e.per_layer else [None])
        for n in checkpoint_names(e, cfg, i)
    }
    skip = [re.compile(p) for p in fam.buffers]
    if cfg.tie_word_embeddings:
        skip += [re.compile(re.escape(e.hf)) for e in fam.weights if e.path == ("lm_head", "kernel")]
    return [n for n in names if n not in expected and not any(p.fullmatch(n) for p in skip)]


# Multimodal checkpoints (families.TEXT_TOWERS) hold the decoder as a text tower: the hub and transformers'
# save_pretrained name it `language_model.model.*` / `language_model.lm_head.*`, transformers 5 in memory
# `model.language_model.*` / `lm_head.*`. The vision tower and the projector are no part of the decoder.
_TOWER_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_OTHER_TOWERS = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..*")


def text_tower_names(names: Iterable[str]) -> dict[str, str]:
    """The spec's name -> the checkpoint's name for the tensors of a multimodal checkpoint, less those of the
    vision tower and projector; other names are kept as they are (so the loader reports them)."""
    out = {}
    for name in names:
        if _OTHER_TOWERS.fullmatch(name):
            continue
        spec_name = name
        for prefix, ours in _TOWER_PREFIXES:
            if name.startswith(prefix):
                spec_name = ours + name.removeprefix(prefix)
                break
        out[spec_name] = name
    return out
