"""What LoRA can target, derived from the model spec (`jaxlora.models.spec`): the per-layer linear layers
(`linear_modules`, `linear_dims`), their short `target_modules` names (`target_names`, PEFT's rule), and
the MoE weights PEFT adapts as `target_parameters` (`param_targets`)."""

import dataclasses
from collections.abc import Iterable

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.families import FAMILIES
from jaxlora.models.spec import CONV1D, layer_ids, name_table


@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A per-layer linear layer LoRA can target."""

    name: str  # HF module name, "q_proj" (the last part of hf_prefix)
    path: tuple[str, ...]  # ("layers", "attn", "q_proj"): its kernel is path + ("kernel",)
    hf_prefix: str  # "model.layers.{i}.self_attn.q_proj"
    fan_in_fan_out: bool  # HF stores the base weight [in, out] (GPT-2 Conv1D)
    in_features: int
    out_features: int
    # The HF layers that have it, in the order of its stack's rows: every layer, or those of its kind in a
    # hybrid model (Qwen3.5: `models.hybrid_weights`), whose adapters are stacked on [L_kind] likewise.
    layers: tuple[int, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """(group, name), e.g. ("attn", "q_proj"): its place under params["layers"] and in a LoRA tree."""
        return self.path[1], self.path[2]

    @property
    def suffix(self) -> str:
        """The last two parts of the HF module name, "self_attn.q_proj" or "attn.c_proj"."""
        return ".".join(self.hf_prefix.split(".")[-2:])


def linear_modules(cfg: DecoderConfig) -> list[LinearModule]:
    """The per-layer linear layers (LoRA candidates; the LM head is never one), in checkpoint order."""
    out = []
    for e in name_table(cfg):
        if e.lora:
            fan_in, fan_out = e.shape(cfg)
            prefix = e.hf.removesuffix(".weight")
            name = prefix.rpartition(".")[2]  # the params key differs for Qwen2-MoE's shared_expert_gate
            layers = layer_ids(e, cfg)
            out.append(LinearModule(name, e.path[:-1], prefix, e.layout == CONV1D, fan_in, fan_out, layers))
    return out


def linear_dims(cfg: DecoderConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(group, module) -> (in_features, out_features) for every per-layer linear layer."""
    return {m.key: (m.in_features, m.out_features) for m in linear_modules(cfg)}


def target_names(cfg: DecoderConfig, keys: Iterable[tuple[str, str]]) -> list[str]:
    """Names for `target_modules` that match exactly the modules `keys` ((group, name) pairs), as PEFT
    matches suffixes: the module name (`q_proj`), unless a module outside `keys` shares it (GPT-2's
    attn.c_proj and mlp.c_proj), then the last two parts (`attn.c_proj`). In the order of `keys`, without
    repeats. Used for PEFT's `target_modules` and for the module list of error messages."""
    keys = list(keys)
    mods = {m.key: m for m in linear_modules(cfg)}
    out: list[str] = []
    for key in keys:
        m = mods[key]
        clash = any(o.name == m.name and o.key not in keys for o in mods.values())
        name = m.suffix if clash else m.name
        if name not in out:
            out.append(name)
    return out


@dataclasses.dataclass(frozen=True)
class ParamTarget:
    """A MoE weight LoRA adapts through PEFT's `target_parameters` (transformers 5 names in memory)."""

    name: str  # "gate_up_proj", "down_proj", "router"
    path: tuple[str, ...]  # ("layers", "moe", "gate_up_proj"): its kernel is path + ("kernel",)
    peft: str  # "model.layers.{i}.mlp.experts.gate_up_proj": the module path plus the parameter name
    in_features: int
    out_features: int
    experts: int  # E for a stacked [E, in, out] kernel, 0 for a plain [in, out] one (the router)
    stream: int  # its A is drawn from fold_in(init key, stream) (`models.weights.Entry.stream`)

    @property
    def key(self) -> tuple[str, str]:
        return self.path[1], self.path[2]


# model_type -> the transformers 4 module names of its MoE weights PEFT still accepts in `target_modules`
# (`models.families.Family.moe_v4_names`).
MOE_V4_NAMES: dict[str, dict[str, str]] = {
    mt: dict(fam.moe_v4_names) for mt, fam in FAMILIES.items() if fam.moe_v4_names
}


def param_targets(cfg: DecoderConfig) -> list[ParamTarget]:
    """The weights `target_parameters` can name on this model (none for a dense model), in the order
    transformers defines them on their module (the order PEFT nests its wrappers in)."""
    out = []
    for e in name_table(cfg):
        if e.param:
            *lead, fan_in, fan_out = e.shape(cfg)  # [(E,) in, out]
            experts = lead[0] if lead else 0
            peft = e.alias or e.hf  # transformers 5's name (the router's alias)
            out.append(ParamTarget(e.path[-2], e.path[:-1], peft, fan_in, fan_out, experts, e.stream))
    return out
