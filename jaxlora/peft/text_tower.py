"""The text tower of a multimodal checkpoint (`models.families.TEXT_TOWERS`) in a PEFT adapter file.

PEFT names an adapter's tensors after the modules of the model it wraps, here the whole
`*ForConditionalGeneration`: transformers 5 puts the decoder under `model.language_model.` and keeps
`lm_head` at the top (`models.checkpoint_names.tower_name`), so the text model's

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight

is `base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight` there. A list of module
names in `target_modules` would also match the vision (or audio) tower's linears (SigLIP has q_proj too),
so the adapter config names the adapted modules by a regex of their full names (`tower_targets`), the
adapted layers inside it (PEFT takes no `layers_to_transform` beside a regex). Reading, both this naming
and transformers 4's (`base_model.model.language_model.model.layers...`) map back to the text model's, and
a tensor of another tower is refused in one line: jaxlora trains the text tower only.
"""

import re
from pathlib import Path

import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.adapters import ALL_LINEAR
from jaxlora.models.checkpoint_names import spec_name, tower_name
from jaxlora.models.config import DecoderConfig
from jaxlora.models.targets import linear_modules

PEFT_PREFIX = "base_model.model."


def _tower_key(key: str) -> str:
    """An adapter tensor's name for the text model -> for the multimodal model."""
    if not key.startswith(PEFT_PREFIX):
        return key
    return PEFT_PREFIX + tower_name(key.removeprefix(PEFT_PREFIX))


def tower_targets(cfg: DecoderConfig, paths, mask: np.ndarray) -> str:
    """PEFT `target_modules`: a regex fullmatching exactly the modules `paths` ((group, name) pairs) in the
    layers `mask` [L] bool, under their names in the multimodal model, and nothing in its other towers."""
    mods = {m.key: m for m in linear_modules(cfg)}
    layers = r"\d+" if mask.all() else "|".join(str(i) for i in np.flatnonzero(mask))
    by_head: dict[str, list[str]] = {}
    for path in paths:  # "model.language_model.layers." + "{i}" + ".self_attn.q_proj"
        head, _, tail = tower_name(mods[path].hf_prefix).partition("{i}")
        by_head.setdefault(head, []).append(re.escape(tail))
    return "|".join(f"{re.escape(h)}(?:{layers})(?:{'|'.join(t)})" for h, t in by_head.items())


def tower_adapter(cfg: DecoderConfig, tensors: dict, config: dict, paths, mask: np.ndarray) -> dict:
    """The adapter's tensors renamed for the multimodal model; `config` (adapter_config.json) set to name
    the adapted modules there (`tower_targets`, the layers inside it)."""
    if paths:
        config["target_modules"] = tower_targets(cfg, paths, mask)
        config["layers_to_transform"] = None
    return {_tower_key(k): v for k, v in tensors.items()}


def tower_matches(cfg: DecoderConfig, targets) -> bool:
    """Whether PEFT `target_modules` (a regex, a list of names, all-linear) select any linear module of the
    text tower under its name in the multimodal model."""
    names = [tower_name(m.hf_prefix.format(i=i)) for m in linear_modules(cfg) for i in m.layers]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith("." + t) for n in names for t in targets)


class TowerAdapterFile:
    """An adapter file of a multimodal model, seen with the text model's tensor names (the reader
    `load_peft_adapter` takes: `names()`, `shape(name)`, `get(name)`); a tensor of another tower is a
    UserError naming it."""

    def __init__(self, st, weights: Path):
        self.st, self.map = st, {}
        for key in st.names():
            rest = key.removeprefix(PEFT_PREFIX)
            ours = spec_name(rest) if key.startswith(PEFT_PREFIX) else rest
            if ours is None:
                raise UserError(
                    f"{weights}: tensor {key} adapts a module outside the text tower (vision or audio "
                    "tower, projector); jaxlora trains and loads the language model only: save the adapter "
                    r"with target_modules limited to it (a regex like '.*language_model.*\.(q_proj|v_proj)')"
                )
            self.map[PEFT_PREFIX + ours if key.startswith(PEFT_PREFIX) else key] = key

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.st.shape(self.map[name])

    def get(self, name: str) -> np.ndarray:
        return self.st.get(self.map[name])
