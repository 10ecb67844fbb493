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

import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.config import LoraConfig
from jaxlora.lora.pissa import init_from_base, is_base_changing
from jaxlora.lora.tokens import MODULES, TOKENS, init_modules, init_tokens
from jaxlora.models.config import DecoderConfig
from jaxlora.models.lora_product import dora_weight_norm
from jaxlora.models.spec import (
    MOE_V4_NAMES,
    LinearModule,
    ParamTarget,
    linear_modules,
    param_targets,
    target_names,
)
from jaxlora.quant import as_kernel

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
        return {m: np.ones(cfg.num_layers, bool) for m in mods}
    if isinstance(targets, str):
        return {
            m: np.array([re.fullmatch(targets, m.hf_prefix.format(i=i)) is not None for i in layers])
            for m in mods
        }
    names = tuple(targets)

    def hit(full: str) -> bool:
        return any(full == t or full.endswith("." + t) for t in names)

    return {m: np.array([hit(m.hf_prefix.format(i=i)) for i in layers]) for m in mods}


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
    """(MoE weight, rank, alpha) of every weight adapted through PEFT's `target_parameters`, in
    transformers' order. As PEFT 0.21 on transformers 5: named in `lora.target_parameters` (the full name
    or a suffix after a dot), or implied by `target_modules` (`all-linear`, or transformers 4 names such as
    `w1`/`w3`/`w2`, `gate_proj`/`up_proj`/`down_proj`, `gate`: the router); the two halves of gate_up_proj
    together give it rank 2r and alpha 2 * alpha. `rank_pattern`/`alpha_pattern` apply to the full name
    (`model.layers.0.mlp.experts.gate_up_proj`). Refuses, in one line, what PEFT cannot express."""
    every = {t.name: t for t in param_targets(cfg)}
    named = tuple(getattr(lora_cfg, "target_parameters", None) or ())
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
            r = pattern_value(getattr(lora_cfg, "rank_pattern", None), full, lora_cfg.r * chosen[name])
            alpha = pattern_value(
                getattr(lora_cfg, "alpha_pattern", None), full, lora_cfg.alpha * chosen[name]
            )
            out.append((target, int(r), float(alpha)))
    return out


def param_scale_factor(lora_cfg: LoraConfig, r: int, alpha: float) -> float:
    """A parameter adapter's scale (alpha / r, or / sqrt(r)) over `scaling(lora_cfg)`: its "s" leaf."""
    rslora = getattr(lora_cfg, "use_rslora", False)
    return float(alpha) / (math.sqrt(r) if rslora else r) / scaling(lora_cfg)


def check_param_adapters(lora_cfg: LoraConfig) -> None:
    """One line refusing the options PEFT's parameter adapters (`target_parameters`) cannot express."""
    blockers = {
        "lora.dropout > 0": lora_cfg.dropout > 0,
        "lora.use_dora": getattr(lora_cfg, "use_dora", False),
        "lora.lora_bias": getattr(lora_cfg, "lora_bias", False),
        f"lora.init {lora_cfg.init}": lora_cfg.init not in INITS,
        "lora.layers_to_transform": getattr(lora_cfg, "layers_to_transform", None) is not None,
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


def _selection(cfg: DecoderConfig, lora_cfg: LoraConfig) -> tuple[list[LinearModule], np.ndarray]:
    """(targeted modules in name-table order, layer mask [L] bool shared by all of them)."""
    targets = lora_cfg.target_modules
    chosen = {m: sel for m, sel in _match_matrix(cfg, targets).items() if sel.any()}
    if not chosen and param_adapters(cfg, lora_cfg):  # only MoE weights (PEFT's target_parameters)
        return [], np.ones(cfg.num_layers, bool)
    if not chosen:
        raise _no_match(cfg, targets)
    layers = getattr(lora_cfg, "layers_to_transform", None)
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
    sets = {tuple(np.flatnonzero(sel)) for sel in chosen.values()}
    if len(sets) > 1:
        detail = ", ".join(f"{m.suffix}: {np.flatnonzero(s).tolist()}" for m, s in chosen.items())
        raise UserError(
            f"lora.target_modules selects different layers for different modules ({detail}); jaxlora adapts "
            "one set of layers for every targeted module: target by name and use lora.layers_to_transform"
        )
    return list(chosen), next(iter(chosen.values()))


def target_paths(cfg: DecoderConfig, lora_cfg: LoraConfig) -> list[tuple[str, str]]:
    """The targeted linear layers as (group, name) pairs, e.g. [("attn", "q_proj"), ("attn", "v_proj")].

    Raises UserError when nothing matches (listing the modules that exist), for layer indices out of
    range, and when the rule would adapt different layers for different modules.
    """
    mods, _ = _selection(cfg, lora_cfg)
    return [m.key for m in mods]


def layer_mask(cfg: DecoderConfig, lora_cfg: LoraConfig) -> np.ndarray:
    """[L] bool: the layers that are adapted (layers_to_transform, or the layers a regex names)."""
    return _selection(cfg, lora_cfg)[1]


def scaling(lora_cfg: LoraConfig) -> float:
    """alpha / r, or alpha / sqrt(r) with `use_rslora` (PEFT's `scaling`)."""
    r = lora_cfg.r
    return float(lora_cfg.alpha) / (math.sqrt(r) if getattr(lora_cfg, "use_rslora", False) else r)


def lora_scale(cfg: DecoderConfig, lora_cfg: LoraConfig) -> np.ndarray:
    """Per-layer scale [L] float32 for `forward(..., lora_scale=...)`: `scaling` on adapted layers, else 0."""
    return (layer_mask(cfg, lora_cfg) * scaling(lora_cfg)).astype(np.float32)


def pattern_value(patterns, name: str, default):
    r"""PEFT's `get_pattern_key`: the value of the first key `k` with `re.match(rf"(.*\.)?({k})$", name)`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def has_patterns(lora_cfg: LoraConfig) -> bool:
    return bool(getattr(lora_cfg, "rank_pattern", None) or getattr(lora_cfg, "alpha_pattern", None))


def module_ranks(cfg: DecoderConfig, lora_cfg: LoraConfig) -> dict[tuple[str, str], np.ndarray]:
    """(group, name) -> [L] int: each targeted module's rank per layer (rank_pattern, else r; 0 where the
    layer is not adapted). The module's arrays have the largest as their r; smaller ones are zero-padded."""
    mods, mask = _selection(cfg, lora_cfg)
    pats = getattr(lora_cfg, "rank_pattern", None)
    return {
        m.key: np.array(
            [
                pattern_value(pats, m.hf_prefix.format(i=i), lora_cfg.r) if mask[i] else 0
                for i in range(len(mask))
            ]
        )
        for m in mods
    }


def module_scale_factors(cfg: DecoderConfig, lora_cfg: LoraConfig) -> dict[tuple[str, str], np.ndarray]:
    """(group, name) -> [L] float32: the module's scale (its pattern alpha over its pattern r) divided by
    `scaling(lora_cfg)`; the adapter's "s" leaf, multiplied into `lora_scale` by the decoder."""
    mods, mask = _selection(cfg, lora_cfg)
    rslora, base = getattr(lora_cfg, "use_rslora", False), scaling(lora_cfg)
    ranks = module_ranks(cfg, lora_cfg)
    out = {}
    for m in mods:
        s = np.zeros(len(mask), np.float32)
        for i in np.flatnonzero(mask):
            alpha = pattern_value(
                getattr(lora_cfg, "alpha_pattern", None), m.hf_prefix.format(i=i), lora_cfg.alpha
            )
            r = ranks[m.key][i]
            s[i] = float(alpha) / (math.sqrt(r) if rslora else r) / base
        out[m.key] = s
    return out


def init_lora(cfg: DecoderConfig, lora_cfg: LoraConfig, rng: jax.Array, params: dict | None = None) -> dict:
    """A fresh float32 LoRA tree {group: {name: {"a": [L, in, r], "b": [L, r, out]}}}, B = 0.

    init "default": A ~ U(-1/sqrt(in), 1/sqrt(in)), PEFT's Kaiming-uniform with a=sqrt(5) on lora_A
    [r, in]; "gaussian": A ~ N(0, (1/r)^2). One draw covers every linear module of the model, so adding
    or dropping other targets does not change a module's A.
    With `rank_pattern`/`alpha_pattern` each module gets its own r (the largest over its layers; a layer
    with a smaller rank has zero A columns and B rows beyond it, which stay zero in training) and an "s"
    leaf [L] (see `module_scale_factors`). With `use_dora`, an "m" leaf [L, out] = ||W|| per output
    column (PEFT's magnitude init, B being 0): `params`, the base weights, are then required.
    """
    init = getattr(lora_cfg, "init", "default")
    base_changing = is_base_changing(init)
    if init not in INITS and not base_changing:
        raise UserError(
            f"lora.init must be one of {', '.join(INITS)}, pissa, pissa_niter_N or olora, got {init!r}"
        )
    mods, mask = _selection(cfg, lora_cfg)
    param_adapters(cfg, lora_cfg)  # refuses what PEFT's parameter adapters cannot express
    if base_changing:
        tree = _init_from_base(cfg, lora_cfg, rng, params, mods, mask)
        if getattr(lora_cfg, "lora_bias", False):
            tree = with_lora_bias(cfg, lora_cfg, tree, params)
        return _with_extras(cfg, lora_cfg, tree, params)
    patterned = has_patterns(lora_cfg)
    ranks = module_ranks(cfg, lora_cfg)
    r_draw = max([int(lora_cfg.r)] + [int(r.max()) for r in ranks.values()]) if patterned else int(lora_cfg.r)
    every = linear_modules(cfg)
    spec = tuple((m.in_features, m.out_features, m in mods) for m in every)
    arrays = iter(_init_arrays(rng, spec, cfg.num_layers, r_draw, init))
    factors = module_scale_factors(cfg, lora_cfg) if patterned else {}
    tree: dict = {}
    for m in every:
        if m not in mods:
            continue
        a, b = next(arrays)
        group, name = m.key
        leaf = {"a": a, "b": b}
        if patterned:
            per_layer = ranks[m.key]  # [L]
            r_mod = int(per_layer.max())
            keep = (np.arange(r_mod)[None, :] < per_layer[:, None]).astype(np.float32)  # [L, r]
            if init == "gaussian":  # N(0, 1/r_draw^2) -> N(0, 1/r_layer^2)
                keep = keep * (r_draw / np.maximum(per_layer, 1))[:, None]
            leaf = {
                "a": a[:, :, :r_mod] * keep[:, None, :],
                "b": b[:, :r_mod],
                "s": jnp.asarray(factors[m.key]),
            }
        tree.setdefault(group, {})[name] = leaf
    for target, r, alpha in param_adapters(cfg, lora_cfg):
        leaf = _init_param_target(rng, target, cfg.num_layers, r, init)
        factor = param_scale_factor(lora_cfg, r, alpha)
        if factor != 1.0:
            leaf["s"] = jnp.full((cfg.num_layers,), factor, jnp.float32)
        tree.setdefault(target.key[0], {})[target.key[1]] = leaf
    if getattr(lora_cfg, "use_dora", False):
        if params is None:
            raise UserError("lora.use_dora needs the base weights to initialize the DoRA magnitudes")
        tree = with_dora_magnitudes(tree, params, lora_scale(cfg, lora_cfg))
    if getattr(lora_cfg, "lora_bias", False):
        tree = with_lora_bias(cfg, lora_cfg, tree, params)
    return _with_extras(cfg, lora_cfg, tree, params)


def _with_extras(cfg: DecoderConfig, lora_cfg: LoraConfig, tree: dict, params: dict | None) -> dict:
    """Add the trainable tokens and modules_to_save copies (`jaxlora.lora.tokens`) the config asks for."""
    tokens = getattr(lora_cfg, "trainable_token_indices", None)
    modules = getattr(lora_cfg, "modules_to_save", None)
    if (tokens or modules) and params is None:
        raise UserError("lora.trainable_token_indices / modules_to_save need the base weights to start from")
    if modules:
        tree[MODULES] = init_modules(cfg, params, modules)
        if tokens and "embed" in tree[MODULES]:
            raise UserError(
                "lora.trainable_token_indices and a modules_to_save embedding copy exclude each other"
            )
    if tokens:
        tree[TOKENS] = init_tokens(cfg, params, tokens)
    return tree


def with_lora_bias(cfg: DecoderConfig, lora_cfg: LoraConfig, tree: dict, params: dict | None) -> dict:
    """Every module with a zero "bias" [L, out] (PEFT's `lora_bias`: lora_B's bias, zero at init)."""
    if getattr(lora_cfg, "use_dora", False):
        raise UserError("lora.lora_bias cannot be combined with lora.use_dora (PEFT refuses it too)")
    if params is not None:
        no_bias = [
            f"{g}.{n}" for g, mods in tree.items() for n in mods if "bias" not in params["layers"][g][n]
        ]
        if no_bias:
            raise UserError(
                f"lora.lora_bias on {no_bias}, which have no bias in this {cfg.model_type} model: the "
                "adapter could not be merged (PEFT warns so); target layers with a bias or drop lora_bias"
            )
    return {
        g: {
            n: {**leaf, "bias": jnp.zeros((leaf["b"].shape[0], leaf["b"].shape[-1]), jnp.float32)}
            for n, leaf in mods.items()
        }
        for g, mods in tree.items()
    }


def _init_from_base(cfg, lora_cfg, rng, params, mods, mask) -> dict:
    """PiSSA / OLoRA (`jaxlora.lora.pissa`): A and B from each adapted layer's base weight."""
    init = lora_cfg.init
    if params is None:
        raise UserError(f"lora.init {init} needs the base weights: A and B are computed from them")
    if getattr(lora_cfg, "use_dora", False):
        raise UserError(f"lora.init {init} cannot be combined with lora.use_dora in jaxlora; pick one")
    if init == "olora" and any(m.fan_in_fan_out for m in mods):
        raise UserError(
            "lora.init olora does not support GPT-2's Conv1D layers (PEFT's OLoRA needs nn.Linear)"
        )
    ranks, factors = module_ranks(cfg, lora_cfg), module_scale_factors(cfg, lora_cfg)
    base = scaling(lora_cfg)
    tree: dict = {}
    for k, m in enumerate(mods):
        group, name = m.key
        kernel = params["layers"][group][name]["kernel"]
        a, b = init_from_base(
            kernel, ranks[m.key], base * factors[m.key], init, jax.random.fold_in(rng, k), m.hf_prefix
        )
        leaf = {"a": a, "b": b}
        if has_patterns(lora_cfg):
            leaf["s"] = jnp.asarray(factors[m.key])
        tree.setdefault(group, {})[name] = leaf
    return tree


def with_dora_magnitudes(lora: dict, params: dict, scale) -> dict:
    """`lora` with "m" [L, out] = ||W + scale * s * A @ B|| per output column of every module (DoRA init)."""
    out: dict = {}
    for group, mods in lora.items():
        for name, leaf in mods.items():
            kernel = as_kernel(params["layers"][group][name]["kernel"], jnp.float32)  # [L, in, out]
            s = jnp.asarray(scale, jnp.float32) * leaf.get("s", 1.0)
            m = dora_weight_norm(kernel, leaf["a"], leaf["b"], jnp.broadcast_to(s, kernel.shape[:1]))
            out.setdefault(group, {})[name] = dict(leaf, m=m)
    return out


_PARAM_STREAMS = {"router": 1001, "gate_up_proj": 1002, "down_proj": 1003}  # fold_in streams of their A


def _init_param_target(rng, target: ParamTarget, n_layers: int, r: int, init: str) -> dict:
    """A [L, (E,) in, r], B zeros [L, (E,) r, out] for a `target_parameters` weight, from its own key (so
    the linear modules' draws do not change). A as PEFT draws lora_A [E*r, in]: U(+-1/sqrt(in)), or
    N(0, 1/r^2) with gaussian."""
    key = jax.random.fold_in(rng, _PARAM_STREAMS[target.name])
    lead = (n_layers, target.experts) if target.experts else (n_layers,)
    shape = (*lead, target.in_features, r)
    if init == "gaussian":
        a = jax.random.normal(key, shape, jnp.float32) / r
    else:
        bound = 1.0 / math.sqrt(target.in_features)
        a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return {"a": a, "b": jnp.zeros((*lead, r, target.out_features), jnp.float32)}


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_arrays(rng, spec: tuple, n_layers: int, r: int, init: str) -> list:
    """[(A [L, in, r], B [L, r, out])] for the kept modules of spec = ((in, out, keep), ...), all linear
    modules of the model in name-table order, from one random draw (one compiled kernel). Drawing for
    every module, kept or not, makes each module's A independent of which others are targeted."""
    sizes = [n_layers * fan_in * r for fan_in, _, _ in spec]
    if init == "gaussian":
        flat = jax.random.normal(rng, (sum(sizes),), jnp.float32) / r
    else:
        flat = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = [], 0
    for (fan_in, fan_out, keep), size in zip(spec, sizes, strict=True):
        if keep:
            a = flat[start : start + size].reshape(n_layers, fan_in, r)
            a = a if init == "gaussian" else a / math.sqrt(fan_in)  # U(-1/sqrt(in), 1/sqrt(in))
            out.append((a, jnp.zeros((n_layers, r, fan_out), jnp.float32)))
        start += size
    return out
