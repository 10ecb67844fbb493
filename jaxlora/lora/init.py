"""A fresh LoRA tree: A drawn as PEFT draws it, B = 0, per-module ranks, MoE parameter adapters, PEFT's
lora_bias, DoRA magnitudes and the PiSSA/OLoRA starts from the base weights."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.adapters import (
    INITS,
    has_patterns,
    layout,
    lora_scale,
    param_scale_factor,
    scaling,
)
from jaxlora.lora.config import LoraConfig
from jaxlora.lora.pissa import init_from_base, is_base_changing
from jaxlora.lora.tokens import MODULES, TOKENS, init_modules, init_tokens
from jaxlora.models.config import DecoderConfig
from jaxlora.models.lora_product import dora_weight_norm
from jaxlora.models.targets import ParamTarget, linear_modules
from jaxlora.quant import as_kernel


def init_lora(cfg: DecoderConfig, lora_cfg: LoraConfig, rng: jax.Array, params: dict | None = None) -> dict:
    """A fresh float32 LoRA tree {group: {name: {"a": [L, in, r], "b": [L, r, out]}}}, B = 0.

    init "default": A ~ U(-1/sqrt(in), 1/sqrt(in)), PEFT's Kaiming-uniform with a=sqrt(5) on lora_A
    [r, in]; "gaussian": A ~ N(0, (1/r)^2). One draw covers every linear module of the model, so adding
    or dropping other targets does not change a module's A.
    With `rank_pattern`/`alpha_pattern` each module gets its own r (the largest over its layers; a layer
    with a smaller rank has zero A columns and B rows beyond it, which stay zero in training) and an "s"
    leaf [L] (`Layout.factors`). With `use_dora`, an "m" leaf [L, out] = ||W|| per output
    column (PEFT's magnitude init, B being 0): `params`, the base weights, are then required.
    """
    init = lora_cfg.init
    base_changing = is_base_changing(init)
    if init not in INITS and not base_changing:
        raise UserError(
            f"lora.init must be one of {', '.join(INITS)}, pissa, pissa_niter_N or olora, got {init!r}"
        )
    if cfg.mixers:  # hybrid layers: these variants assume one [L] stack per module (not yet checked)
        flags = {"lora.use_dora": lora_cfg.use_dora, "lora.lora_bias": lora_cfg.lora_bias}
        flags[f"lora.init {init}"] = base_changing
        unsupported = [name for name, on in flags.items() if on]
        if unsupported:
            raise UserError(
                f"{unsupported[0]} is not supported yet for {cfg.model_type} (its layers stack weights "
                "by layer kind); train plain LoRA"
            )
    lay = layout(cfg, lora_cfg)  # refuses targets that match nothing, and what PEFT cannot express
    mods, mask = list(lay.modules), lay.mask
    if base_changing:
        tree = _init_from_base(cfg, lora_cfg, rng, params, mods, mask)
        if lora_cfg.lora_bias:
            tree = with_lora_bias(cfg, lora_cfg, tree, params)
        return _with_extras(cfg, lora_cfg, tree, params)
    tree = _init_modules(cfg, lora_cfg, rng, mods)
    for target, r, alpha in lay.params:
        leaf = _init_param_target(rng, target, cfg.num_layers, r, init)
        factor = param_scale_factor(lora_cfg, r, alpha)
        if factor != 1.0:
            leaf["s"] = jnp.full((cfg.num_layers,), factor, jnp.float32)
        tree.setdefault(target.key[0], {})[target.key[1]] = leaf
    if lora_cfg.use_dora:
        if params is None:
            raise UserError("lora.use_dora needs the base weights to initialize the DoRA magnitudes")
        tree = with_dora_magnitudes(tree, params, lora_scale(cfg, lora_cfg))
    if lora_cfg.lora_bias:
        tree = with_lora_bias(cfg, lora_cfg, tree, params)
    return _with_extras(cfg, lora_cfg, tree, params)


def _init_modules(cfg: DecoderConfig, lora_cfg: LoraConfig, rng: jax.Array, mods) -> dict:
    """A [L, in, r] and B = 0 [L, r, out] of the targeted linear modules `mods`, from one draw over every
    linear module; with rank/alpha patterns each module at its own largest rank, with its "s" leaf."""
    init, patterned = lora_cfg.init, has_patterns(lora_cfg)
    lay = layout(cfg, lora_cfg)
    r_draw = (
        max([int(lora_cfg.r)] + [int(r.max()) for r in lay.ranks.values()]) if patterned else int(lora_cfg.r)
    )
    every = linear_modules(cfg)
    spec = tuple((m.in_features, m.out_features, m in mods) for m in every)
    arrays = iter(_init_arrays(rng, spec, cfg.num_layers, r_draw, init))
    tree: dict = {}
    for m in [m for m in every if m in mods]:
        a, b = next(arrays)
        rows = list(m.layers)  # a hybrid model's mixer: the rows of its layers, [L_kind]
        if len(rows) != cfg.num_layers:
            a, b = a[np.asarray(rows)], b[np.asarray(rows)]
        leaf = {"a": a, "b": b}
        if patterned:
            per_layer = lay.ranks[m.key][rows]  # [L]
            r_mod = int(per_layer.max())
            keep = (np.arange(r_mod)[None, :] < per_layer[:, None]).astype(np.float32)  # [L, r]
            if init == "gaussian":  # N(0, 1/r_draw^2) -> N(0, 1/r_layer^2)
                keep = keep * (r_draw / np.maximum(per_layer, 1))[:, None]
            leaf = {
                "a": a[:, :, :r_mod] * keep[:, None, :],
                "b": b[:, :r_mod],
                "s": jnp.asarray(lay.factors[m.key][rows]),
            }
        tree.setdefault(m.key[0], {})[m.key[1]] = leaf
    return tree


def _with_extras(cfg: DecoderConfig, lora_cfg: LoraConfig, tree: dict, params: dict | None) -> dict:
    """Add the trainable tokens and modules_to_save copies (`jaxlora.lora.tokens`) the config asks for."""
    tokens = lora_cfg.trainable_token_indices
    modules = lora_cfg.modules_to_save
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
    if lora_cfg.use_dora:
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
    if lora_cfg.use_dora:
        raise UserError(f"lora.init {init} cannot be combined with lora.use_dora in jaxlora; pick one")
    if init == "olora" and any(m.fan_in_fan_out for m in mods):
        raise UserError(
            "lora.init olora does not support GPT-2's Conv1D layers (PEFT's OLoRA needs nn.Linear)"
        )
    lay = layout(cfg, lora_cfg)
    ranks, factors, base = lay.ranks, lay.factors, scaling(lora_cfg)
    tree: dict = {}
    for k, m in enumerate(mods):
        group, name = m.key
        kernel = params["layers"][group][name]["kernel"]
        rows = list(m.layers)  # [L], or a hybrid model's mixer's [L_kind]
        a, b = init_from_base(
            kernel,
            ranks[m.key][rows],
            base * factors[m.key][rows],
            init,
            jax.random.fold_in(rng, k),
            m.hf_prefix,
        )
        leaf = {"a": a, "b": b}
        if has_patterns(lora_cfg):
            leaf["s"] = jnp.asarray(factors[m.key][rows])
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


def _init_param_target(rng, target: ParamTarget, n_layers: int, r: int, init: str) -> dict:
    """A [L, (E,) in, r], B zeros [L, (E,) r, out] for a `target_parameters` weight, from its own key (so
    the linear modules' draws do not change). A as PEFT draws lora_A [E*r, in]: U(+-1/sqrt(in)), or
    N(0, 1/r^2) with gaussian."""
    key = jax.random.fold_in(rng, target.stream)  # the weight's own stream (`models.weights.Entry`)
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
