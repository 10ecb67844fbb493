"""What LoRA can target, derived from the model spec (`jaxlora.models.spec`): the per-layer linear layers
(`linear_modules`, `linear_dims`), their short `target_modules` names (`target_names`, PEFT's rule), and
the MoE weights PEFT adapts as `target_parameters` (`param_targets`)."""

import dataclasses
from collections.abc import Iterable

from jaxlora.models.config import DecoderConfig
from jaxlora.models.spec import LAYER, name_table

LINEAR, CONV1D, VECTOR, EMBEDDING = "linear", "conv1d", "vector", "embedding"
# Stacked experts: jaxlora [E, in, out]; HF's fused layout (transformers 5 in memory) [E, out, in] under
# `hf`, the hub's per-expert layout as torch Linears [out, in] under `parts` (concatenated along `out`).


@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A per-layer linear layer LoRA can target."""

    name: str  # HF module name, "q_proj" (the last part of hf_prefix)
    path: tuple[str, ...]  # ("layers", "attn", "q_proj"): its kernel is path + ("kernel",)
    hf_prefix: str  # "model.layers.{i}.self_attn.q_proj"
    fan_in_fan_out: bool  # HF stores the base weight [in, out] (GPT-2 Conv1D)
    in_features: int
    out_features: int

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
            out.append(LinearModule(name, e.path[:-1], prefix, e.layout == CONV1D, fan_in, fan_out))
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

    @property
    def key(self) -> tuple[str, str]:
        return self.path[1], self.path[2]


# transformers 4 module names of the MoE weights, which PEFT still accepts in `target_modules` and converts
# to `target_parameters` (two of them fused into gate_up_proj, whose adapter then has twice the rank).
# Not qwen2_moe: PEFT 0.21 converts none for it (`gate_proj` etc. then name only the shared expert's
# linears, and `all-linear` leaves experts and router alone), so jaxlora does the same.
MOE_V4_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "router", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen3_moe": {
        "gate": "router",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}


def param_targets(cfg: DecoderConfig) -> list[ParamTarget]:
    """The weights `target_parameters` can name on this model (none for a dense model), in the order
    transformers defines them on their module (the order PEFT nests its wrappers in)."""
    if not cfg.num_experts:
        return []
    mlp = LAYER + "mlp."
    f, d = cfg.moe_intermediate_size, cfg.hidden_size
    return [
        ParamTarget("router", ("layers", "moe", "router"), mlp + "gate.weight", d, cfg.num_experts, 0),
        ParamTarget(
            "gate_up_proj",
            ("layers", "moe", "gate_up_proj"),
            mlp + "experts.gate_up_proj",
            d,
            2 * f,
            cfg.num_experts,
        ),
        ParamTarget(
            "down_proj", ("layers", "moe", "down_proj"), mlp + "experts.down_proj", f, d, cfg.num_experts
        ),
    ]
