"""LoRA adapters as a separate pytree: targets, init and scaling, with PEFT's meanings (merging: `merge`).

A targeted linear layer computes `base(x) + scale * B(A(dropout(x)))` (in `models.decoder.linear`), with

    scale = alpha / r            (alpha / sqrt(r) with rsLoRA), 0 for layers not in layers_to_transform
    lora[group][name] = {"a": [L, in, r], "b": [L, r, out]}     float32, whatever the base dtype

The tree mirrors `params["layers"]` and holds only the targeted modules; `A` is PEFT's `lora_A.weight.T`
and `B` is `lora_B.weight.T`. Layers are stacked on axis 0 (the decoder scans them), so a layer left out
by `layers_to_transform` still has (unused, never exported) slots and gets its 0 from `lora_scale`.

Options (`jaxlora.lora.LoraConfig`, validated where it is built) keep PEFT's names and meanings:
`r`, `alpha` (PEFT `lora_alpha`), `dropout`, `target_modules`, `use_rslora`, `init`, `layers_to_transform`.
`target_modules` is matched as PEFT does, against full HF module names such as
`model.layers.0.self_attn.q_proj`: a list entry matches the whole name or a suffix after a dot; a string
is a regex that must match the whole name; `all-linear` is every per-layer linear layer (never the LM head).
"""

import dataclasses
import functools
import math
import re

import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.config import LoraConfig
from jaxlora.models.config import DecoderConfig
from jaxlora.models.targets import (
    MOE_V4_NAMES,
    LinearModule,
    ParamTarget,
    linear_modules,
    param_targets,
    target_names,
)

ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian")


def _module_list(cfg: DecoderConfig) -> str:
    """The names a user may target, for error messages (`attn.c_proj` where a short name is ambiguous)."""
    return ", ".join(target_names(cfg, [m.key])[0] for m in linear_modules(cfg))


def _match_matrix(cfg: DecoderConfig, targets) -> dict[LinearModule, np.ndarray]:
    """For every linear module, which layers [L] bool `targets` selects (before layers_to_transform)."""
    mods = linear_modules(cfg)
    layers = range(cfg.num_layers)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return {m: np.isin(layers, m.layers) for m in mods}
    if isinstance(targets, str):
        return {
            m: np.array(
                [i in m.layers and re.fullmatch(targets, m.hf_prefix.format(i=i)) is not None for i in layers]
            )
            for m in mods
        }
    names = tuple(targets)

    def hit(full: str) -> bool:
        return any(full == t or full.endswith("." + t) for t in names)

    return {m: np.array([i in m.layers and hit(m.hf_prefix.format(i=i)) for i in layers]) for m in mods}


def _no_match(cfg: DecoderConfig, targets) -> UserError:
    shown = targets if isinstance(targets, str) else list(targets)
    example = linear_modules(cfg)[0].hf_prefix.format(i=0)
    experts = ""
    if cfg.num_experts:
        experts = "; experts and router are adapted with lora.target_parameters (as in PEFT)"
    return UserError(
        f"lora.target_modules {shown!r} matches no linear layer of this {cfg.model_type} model; "
        f"its linear modules are: {_module_list(cfg)} (full names like {example}){experts}"
    )


def param_adapters(cfg: DecoderConfig, lora_cfg: LoraConfig) -> list[tuple[ParamTarget, int, float]]:
    """(MoE weight, rank, alpha) of every weight adapted through PEFT's `target_parameters` (`Layout`)."""
    return list(layout(cfg, lora_cfg).params)


def _param_adapters(cfg: DecoderConfig, lora_cfg: LoraConfig) -> list[tuple[ParamTarget, int, float]]:
    """(MoE weight, rank, alpha) of every weight adapted through PEFT's `target_parameters`, in
    transformers' order. As PEFT 0.21 on transformers 5: named in `lora.target_parameters` (the full name
    or a suffix after a dot), or implied by `target_modules` (`all-linear`, or transformers 4 names such as
    `w1`/`w3`/`w2`, `gate_proj`/`up_proj`/`down_proj`, `gate`: the router); the two halves of gate_up_proj
    together give it rank 2r and alpha 2 * alpha. `rank_pattern`/`alpha_pattern` apply to the full name
    (`model.layers.0.mlp.experts.gate_up_proj`). Refuses, in one line, what PEFT cannot express."""
    every = {t.name: t for t in param_targets(cfg)}
    named = tuple(lora_cfg.target_parameters or ())
    if named and not every:
        raise UserError(f"lora.target_parameters is for mixture-of-experts models; {cfg.model_type} has none")
    chosen: dict[str, int] = {}  # name -> how many transformers 4 modules it fuses (1 = as named)
    for t in named:
        hits = [p for p in every.values() if p.peft.format(i=0) == t or p.peft.format(i=0).endswith("." + t)]
        if not hits:
            known = ", ".join(p.peft.removeprefix("model.layers.{i}.") for p in every.values())
            raise UserError(f"lora.target_parameters {t!r} names no weight of this model; it has: {known}")
        chosen.update({p.name: 1 for p in hits})
    old = MOE_V4_NAMES.get(cfg.model_type, {})
    modules = lora_cfg.target_modules
    if isinstance(modules, str) and modules.lower() == ALL_LINEAR:
        modules = tuple(old)
    if old and not isinstance(modules, str):
        hit = {o for o in old for t in modules if t == o or t.endswith("." + o)}
        for name in {old[o] for o in hit}:
            halves = sorted(o for o in old if old[o] == name)
            if len(halves) > 1 and set(halves) - hit:
                raise UserError(
                    f"lora.target_modules names {', '.join(sorted(hit & set(halves)))} without "
                    f"{', '.join(sorted(set(halves) - hit))}: they are fused into {name} in transformers 5, "
                    "so PEFT can only adapt them together"
                )
            chosen[name] = max(chosen.get(name, 1), len(halves))
    if not chosen:
        return []
    check_param_adapters(lora_cfg)
    out = []
    for name, target in every.items():
        if name in chosen:
            full = target.peft.format(i=0)
            r = pattern_value(lora_cfg.rank_pattern, full, lora_cfg.r * chosen[name])
            alpha = pattern_value(lora_cfg.alpha_pattern, full, lora_cfg.alpha * chosen[name])
            out.append((target, int(r), float(alpha)))
    return out


def param_scale_factor(lora_cfg: LoraConfig, r: int, alpha: float) -> float:
    """A parameter adapter's scale (alpha / r, or / sqrt(r)) over `scaling(lora_cfg)`: its "s" leaf."""
    rslora = lora_cfg.use_rslora
    return float(alpha) / (math.sqrt(r) if rslora else r) / scaling(lora_cfg)


def check_param_adapters(lora_cfg: LoraConfig) -> None:
    """One line refusing the options PEFT's parameter adapters (`target_parameters`) cannot express."""
    blockers = {
        "lora.dropout > 0": lora_cfg.dropout > 0,
        "lora.use_dora": lora_cfg.use_dora,
        "lora.lora_bias": lora_cfg.lora_bias,
        f"lora.init {lora_cfg.init}": lora_cfg.init not in INITS,
        "lora.layers_to_transform": lora_cfg.layers_to_transform is not None,
    }
    bad = [k for k, v in blockers.items() if v]
    if bad:
        raise UserError(
            f"adapting MoE weights (lora.target_parameters, or experts/router implied by target_modules) "
            f"cannot be combined with {', '.join(bad)}: PEFT's parameter adapters (ParamWrapper) cannot "
            "express it, so the adapter could not be loaded in PyTorch"
        )


def matching_paths(cfg: DecoderConfig, target_modules) -> list[tuple[str, str]]:
    """(group, name) of every linear module `target_modules` matches in at least one layer (PEFT rules).

    Raises UserError listing the modules that exist when nothing matches.
    """
    matches = _match_matrix(cfg, target_modules)
    paths = [m.key for m, sel in matches.items() if sel.any()]
    if not paths:
        raise _no_match(cfg, target_modules)
    return paths


def _select(cfg: DecoderConfig, lora_cfg: LoraConfig) -> tuple[list[LinearModule], np.ndarray]:
    """(targeted modules in name-table order, layer mask [L] bool shared by all of them)."""
    targets = lora_cfg.target_modules
    chosen = {m: sel for m, sel in _match_matrix(cfg, targets).items() if sel.any()}
    if not chosen and _param_adapters(cfg, lora_cfg):  # only MoE weights (PEFT's target_parameters)
        return [], np.ones(cfg.num_layers, bool)
    if not chosen:
        raise _no_match(cfg, targets)
    layers = lora_cfg.layers_to_transform
    if layers is not None:
        if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
            raise UserError(
                "lora.layers_to_transform cannot be combined with a regex lora.target_modules (as in PEFT); "
                "put the layer numbers in the regex or use a list of module names"
            )
        layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise UserError(
                f"lora.layers_to_transform {layers} has indices {bad} outside the model's "
                f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})"
            )
        keep = np.zeros(cfg.num_layers, bool)
        keep[layers] = True
        chosen = {m: sel & keep for m, sel in chosen.items()}
        if not any(sel.any() for sel in chosen.values()):
            raise UserError(
                f"lora.target_modules {targets!r} matches no module in lora.layers_to_transform {layers}"
            )
        chosen = {m: sel for m, sel in chosen.items() if sel.any()}
    # one set of layers; a hybrid model's mixer module agrees with it on the layers it exists on
    mask = np.logical_or.reduce(list(chosen.values()))
    if any((sel != mask)[list(m.layers)].any() for m, sel in chosen.items()):
        detail = ", ".join(f"{m.suffix}: {np.flatnonzero(s).tolist()}" for m, s in chosen.items())
        raise UserError(
            f"lora.target_modules selects different layers for different modules ({detail}); jaxlora adapts "
            "one set of layers for every targeted module: target by name and use lora.layers_to_transform"
        )
    return list(chosen), mask


def target_paths(cfg: DecoderConfig, lora_cfg: LoraConfig) -> list[tuple[str, str]]:
    """The targeted linear layers as (group, name) pairs, e.g. [("attn", "q_proj"), ("attn", "v_proj")].

    Raises UserError when nothing matches (listing the modules that exist), for layer indices out of
    range, and when the rule would adapt different layers for different modules.
    """
    return [m.key for m in layout(cfg, lora_cfg).modules]


def layer_mask(cfg: DecoderConfig, lora_cfg: LoraConfig) -> np.ndarray:
    """[L] bool: the layers that are adapted (layers_to_transform, or the layers a regex names)."""
    return layout(cfg, lora_cfg).mask


def scaling(lora_cfg: LoraConfig) -> float:
    """alpha / r, or alpha / sqrt(r) with `use_rslora` (PEFT's `scaling`)."""
    r = lora_cfg.r
    return float(lora_cfg.alpha) / (math.sqrt(r) if lora_cfg.use_rslora else r)


def lora_scale(cfg: DecoderConfig, lora_cfg: LoraConfig) -> np.ndarray:
    """Per-layer scale [L] float32 for `forward(..., lora_scale=...)`: `scaling` on adapted layers, else 0."""
    return layout(cfg, lora_cfg).scale


def pattern_value(patterns, name: str, default):
    r"""PEFT's `get_pattern_key`: the value of the first key `k` with `re.match(rf"(.*\.)?({k})$", name)`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def has_patterns(lora_cfg: LoraConfig) -> bool:
    return bool(lora_cfg.rank_pattern or lora_cfg.alpha_pattern)


def module_ranks(cfg: DecoderConfig, lora_cfg: LoraConfig) -> dict[tuple[str, str], np.ndarray]:
    """(group, name) -> [L] int: each targeted module's rank per layer (rank_pattern, else r; 0 where the
    layer is not adapted). The module's arrays have the largest as their r; smaller ones are zero-padded."""
    return dict(layout(cfg, lora_cfg).ranks)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What an adapter holds and how each part is scaled, resolved once from the model and `LoraConfig`
    (`layout`); every question about targets, ranks and scales reads it instead of matching again."""

    modules: tuple[LinearModule, ...]  # the targeted linear modules, in name-table order
    mask: np.ndarray  # [L] bool: the adapted layers (one set for every module)
    ranks: dict[tuple[str, str], np.ndarray]  # module key -> [L] int, 0 where not adapted
    factors: dict[tuple[str, str], np.ndarray]  # module key -> [L] float32: its scale (pattern alpha over
    # pattern r) over `scaling`, the adapter's "s" leaf, multiplied into `lora_scale` by the decoder
    params: tuple[tuple[ParamTarget, int, float], ...]  # MoE weights: (target, rank, alpha)
    scale: np.ndarray  # [L] float32: `scaling` on adapted layers, else 0


def layout(cfg: DecoderConfig, lora_cfg: LoraConfig) -> Layout:
    """The `Layout` of `lora_cfg` on model `cfg` (cached: the config is matched once per run)."""
    return _layout(cfg, lora_cfg.model_dump_json())


@functools.lru_cache(maxsize=64)
def _layout(cfg: DecoderConfig, lora_json: str) -> Layout:
    lora_cfg = LoraConfig.model_validate_json(lora_json)
    mods, mask = _select(cfg, lora_cfg)
    ranks = {
        m.key: _frozen(np.array(_layer_values(m, mask, lora_cfg.rank_pattern, lora_cfg.r))) for m in mods
    }
    rslora, base = lora_cfg.use_rslora, scaling(lora_cfg)
    factors = {}
    for m in mods:
        alphas = _layer_values(m, mask, lora_cfg.alpha_pattern, lora_cfg.alpha)
        s = np.zeros(len(mask), np.float32)
        for i in np.flatnonzero(mask):
            if i not in m.layers:
                continue
            r = ranks[m.key][i]
            s[i] = float(alphas[i]) / (math.sqrt(r) if rslora else r) / base
        factors[m.key] = _frozen(s)
    scale = _frozen((mask * base).astype(np.float32))
    params = tuple(_param_adapters(cfg, lora_cfg))
    return Layout(tuple(mods), _frozen(mask), ranks, factors, params, scale)


def _layer_values(m: LinearModule, mask: np.ndarray, patterns, default) -> list:
    """Per layer: the pattern value for module `m` (PEFT's full-name match), 0 where not adapted."""
    return [
        pattern_value(patterns, m.hf_prefix.format(i=i), default) if mask[i] and i in m.layers else 0
        for i in range(len(mask))
    ]


def _frozen(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)  # shared by every caller of the cached layout
    return x
