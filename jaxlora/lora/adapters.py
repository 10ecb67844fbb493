"""LoRA adapters as a separate pytree: targets, init, scaling, merge and unmerge, with PEFT's meanings.

A targeted linear layer computes `base(x) + scale * B(A(dropout(x)))` (in `models.decoder.linear`), with

    scale = alpha / r            (alpha / sqrt(r) with rsLoRA), 0 for layers not in layers_to_transform
    lora[group][name] = {"a": [L, in, r], "b": [L, r, out]}     float32, whatever the base dtype

The tree mirrors `params["layers"]` and holds only the targeted modules; `A` is PEFT's `lora_A.weight.T`
and `B` is `lora_B.weight.T`. Layers are stacked on axis 0 (the decoder scans them), so a layer left out
by `layers_to_transform` still has (unused, never exported) slots and gets its 0 from `lora_scale`.

Options (`jaxlora.config.LoraSection`, re-exported here as `LoraConfig`) keep PEFT's names and meanings:
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

from jaxlora.config import LoraSection
from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig
from jaxlora.models.names import LinearModule, linear_dims, linear_modules
from jaxlora.quant import QuantizedTensor, dequantize, num_params

LoraConfig = LoraSection
ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian")


def _r(lora_cfg) -> int:
    r = lora_cfg.r
    if isinstance(r, bool) or not isinstance(r, int | np.integer) or r <= 0:
        raise UserError(f"lora.r must be a positive integer, got {r!r}")
    return int(r)


def _module_list(cfg: DecoderConfig) -> str:
    """The names a user may target, for error messages (`attn.c_proj` where a short name is ambiguous)."""
    names = [m.name for m in linear_modules(cfg)]
    out = []
    for m in linear_modules(cfg):
        out.append(_suffix(m, 2) if names.count(m.name) > 1 else m.name)
    return ", ".join(out)


def _suffix(m: LinearModule, parts: int) -> str:
    return ".".join(m.hf_prefix.split(".")[-parts:])


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
    return UserError(
        f"lora.target_modules {shown!r} matches no linear layer of this {cfg.model_type} model; "
        f"its linear modules are: {_module_list(cfg)} (full names like {example})"
    )


def matching_paths(cfg: DecoderConfig, target_modules) -> list[tuple[str, str]]:
    """(group, name) of every linear module `target_modules` matches in at least one layer (PEFT rules).

    Raises UserError listing the modules that exist when nothing matches.
    """
    matches = _match_matrix(cfg, target_modules)
    paths = [(m.path[1], m.path[2]) for m, sel in matches.items() if sel.any()]
    if not paths:
        raise _no_match(cfg, target_modules)
    return paths


def _selection(cfg: DecoderConfig, lora_cfg) -> tuple[list[LinearModule], np.ndarray]:
    """(targeted modules in name-table order, layer mask [L] bool shared by all of them)."""
    _r(lora_cfg)
    targets = lora_cfg.target_modules
    chosen = {m: sel for m, sel in _match_matrix(cfg, targets).items() if sel.any()}
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
        detail = ", ".join(f"{_suffix(m, 2)}: {np.flatnonzero(s).tolist()}" for m, s in chosen.items())
        raise UserError(
            f"lora.target_modules selects different layers for different modules ({detail}); jaxlora adapts "
            "one set of layers for every targeted module: target by name and use lora.layers_to_transform"
        )
    return list(chosen), next(iter(chosen.values()))


def target_paths(cfg: DecoderConfig, lora_cfg) -> list[tuple[str, str]]:
    """The targeted linear layers as (group, name) pairs, e.g. [("attn", "q_proj"), ("attn", "v_proj")].

    Raises UserError when nothing matches (listing the modules that exist), for r <= 0, for layer indices
    out of range, and when the rule would adapt different layers for different modules.
    """
    mods, _ = _selection(cfg, lora_cfg)
    return [(m.path[1], m.path[2]) for m in mods]


def layer_mask(cfg: DecoderConfig, lora_cfg) -> np.ndarray:
    """[L] bool: the layers that are adapted (layers_to_transform, or the layers a regex names)."""
    return _selection(cfg, lora_cfg)[1]


def scaling(lora_cfg) -> float:
    """alpha / r, or alpha / sqrt(r) with `use_rslora` (PEFT's `scaling`)."""
    r = _r(lora_cfg)
    return float(lora_cfg.alpha) / (math.sqrt(r) if getattr(lora_cfg, "use_rslora", False) else r)


def lora_scale(cfg: DecoderConfig, lora_cfg) -> np.ndarray:
    """Per-layer scale [L] float32 for `forward(..., lora_scale=...)`: `scaling` on adapted layers, else 0."""
    return (layer_mask(cfg, lora_cfg) * scaling(lora_cfg)).astype(np.float32)


def init_lora(cfg: DecoderConfig, lora_cfg, rng: jax.Array) -> dict:
    """A fresh float32 LoRA tree {group: {name: {"a": [L, in, r], "b": [L, r, out]}}}, B = 0.

    init "default": A ~ U(-1/sqrt(in), 1/sqrt(in)), PEFT's Kaiming-uniform with a=sqrt(5) on lora_A
    [r, in]; "gaussian": A ~ N(0, (1/r)^2). One draw covers every linear module of the model, so adding
    or dropping other targets does not change a module's A.
    """
    init = getattr(lora_cfg, "init", "default")
    if init not in INITS:
        raise UserError(f"lora.init must be one of {', '.join(INITS)}, got {init!r}")
    mods, _ = _selection(cfg, lora_cfg)
    dims = linear_dims(cfg)
    spec = tuple((*dims[(m.path[1], m.path[2])], m in mods) for m in linear_modules(cfg))
    arrays = iter(_init_arrays(rng, spec, cfg.num_layers, _r(lora_cfg), init))
    tree: dict = {}
    for m in linear_modules(cfg):
        if m in mods:
            a, b = next(arrays)
            tree.setdefault(m.path[1], {})[m.path[2]] = {"a": a, "b": b}
    return tree


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


def count_params(tree) -> int:
    """Number of weights in a pytree (a `QuantizedTensor` counts as its dense shape)."""
    return int(num_params(tree))


@jax.jit
def _merged_kernels(kernels: dict, lora: dict, scale, sign) -> dict:
    """Each targeted kernel [L, in, out] (dense or quantized) + sign * scale[l] * A[l] @ B[l], in float32."""

    def one(kernel, ab):
        if isinstance(kernel, QuantizedTensor):
            dense = dequantize(kernel, jnp.float32)
        else:
            dense = kernel.astype(jnp.float32)
        s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (dense.shape[0],))
        a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
        delta = jnp.einsum("lir,lro->lio", a, b, precision="highest")
        return (dense + sign * s[:, None, None] * delta).astype(kernel.dtype)

    return {g: {n: one(kernels[g][n], lora[g][n]) for n in mods} for g, mods in lora.items()}


def _apply(params: dict, lora: dict, scale, sign: float) -> dict:
    kernels: dict = {}
    for group, mods in lora.items():
        for name, ab in mods.items():
            kernel = params["layers"][group][name]["kernel"]
            a, b = ab["a"], ab["b"]
            if tuple(kernel.shape) != (*a.shape[:2], b.shape[-1]) or a.shape[::2] != b.shape[:2]:
                raise UserError(
                    f"LoRA for {group}.{name} has A {list(a.shape)} and B {list(b.shape)} but the kernel is "
                    f"{list(kernel.shape)}: the adapter belongs to a different base model"
                )
            kernels.setdefault(group, {})[name] = kernel
    merged = _merged_kernels(kernels, lora, jnp.asarray(scale, jnp.float32), jnp.float32(sign))
    layers = dict(params["layers"])
    for group, mods in merged.items():
        layers[group] = dict(layers[group])
        for name, kernel in mods.items():
            layers[group][name] = dict(layers[group][name], kernel=kernel)
    return dict(params, layers=layers)


def merge(params: dict, lora: dict, scale) -> dict:
    """New params with `W + scale[l] * A[l] @ B[l]` in every targeted kernel [L, in, out].

    `scale` is a scalar or the [L] array from `lora_scale`. The sum is done in float32 and cast to the
    kernel's dtype. A quantized kernel (`QuantizedTensor`) is dequantized first and comes back as a dense
    float kernel in its original dtype: re-quantizing would throw most of the small update away. The input
    tree is not modified; untouched leaves are shared.
    """
    return _apply(params, lora, scale, 1.0)


def unmerge(params: dict, lora: dict, scale) -> dict:
    """The inverse of `merge`: `W - scale[l] * A[l] @ B[l]` (exact up to float rounding)."""
    return _apply(params, lora, scale, -1.0)
