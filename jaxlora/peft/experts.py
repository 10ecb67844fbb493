"""PEFT's parameter adapters (`target_parameters`) of mixture-of-experts models, in and out of the adapter
files: tensor names, the [E*r, in] / [out, r*E] layouts, and the rank/alpha patterns (used by
`jaxlora.peft.adapter`).
"""

import re
from pathlib import Path

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig
from jaxlora.lora.adapters import check_param_adapters, param_adapters, param_scale_factor, pattern_value
from jaxlora.models.config import DecoderConfig
from jaxlora.models.safetensors_io import SafetensorsFile
from jaxlora.models.targets import ParamTarget

PEFT_PREFIX = "base_model.model."


def param_peft_key(target: ParamTarget, chosen: list[ParamTarget], layer: int, which: str) -> str:
    """PEFT's tensor name for a `target_parameters` adapter (`which` "A" or "B"). PEFT wraps the module
    once per targeted parameter, in the order the module defines them, each wrapper around the last, so
    with both expert weights targeted the first (gate_up_proj) sits under `experts.base_layer`."""
    module = target.peft.rpartition(".")[0]
    siblings = [t for t in chosen if t.peft.rpartition(".")[0] == module]
    depth = len(siblings) - 1 - siblings.index(target)
    return f"{PEFT_PREFIX}{module.format(i=layer)}.{'base_layer.' * depth}lora_{which}.weight"


def param_to_peft(target: ParamTarget, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A [(E,) in, r], B [(E,) r, out] -> PEFT's lora_A.weight, lora_B.weight. Experts:
    lora_A [E*r, in] (expert-major rows), lora_B [out, r*E] (column k*E + e: rank-major), as ParamWrapper
    reshapes them."""
    if not target.experts:
        return a.T, b.T
    e, n_in, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(b.shape[-1], r * e)


def param_from_peft(target: ParamTarget, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_param_to_peft`."""
    if not target.experts:
        return a.T, b.T
    e = target.experts
    r = a.shape[0] // e
    return a.reshape(e, r, a.shape[1]).transpose(0, 2, 1), b.reshape(b.shape[0], r, e).transpose(2, 1, 0)


def param_config(config: dict, cfg: DecoderConfig, lora_cfg, chosen: list[ParamTarget]) -> None:
    """`target_parameters` into the adapter config, with a rank/alpha pattern for each parameter adapter
    whose rank or alpha is not r/lora_alpha (gate_up_proj fused from two transformers 4 modules: 2r)."""
    check_param_adapters(lora_cfg)
    adapters = {t: (r, alpha) for t, r, alpha in param_adapters(cfg, lora_cfg)}
    if set(adapters) != set(chosen):
        names = [".".join(t.key) for t in chosen]
        raise UserError(f"LoRA tree has MoE adapters {names} that lora.target_parameters does not name")
    ranks, alphas = config["rank_pattern"], config["alpha_pattern"]
    for t in chosen:
        r, alpha = adapters[t]
        key = rf".*\.{re.escape(t.peft.rpartition('.')[2] if t.experts else 'gate.weight')}"
        if pattern_value(ranks, t.peft.format(i=0), lora_cfg.r) != r:
            ranks[key] = r
        if pattern_value(alphas, t.peft.format(i=0), lora_cfg.alpha) != alpha:
            alphas[key] = alpha
    config["target_parameters"] = param_target_names(chosen)


def param_target_names(chosen: list[ParamTarget]) -> list[str]:
    """`target_parameters` as PEFT writes them: the names under the layer, sorted."""
    return sorted(t.peft.removeprefix("model.layers.{i}.") for t in chosen)


def read_param_targets(conf: dict, cfg: DecoderConfig, st: SafetensorsFile, weights: Path):
    """The `target_parameters` adapters of the file (experts, router) as {(group, name): {"a", "b"}}
    stacked over layers, and the set of their tensor names. Every layer must have them (PEFT's
    parameter adapters have no layers_to_transform)."""
    names = conf.get("target_parameters") or []
    if not names:
        return {}, set()
    where = f"{weights.parent / 'adapter_config.json'}"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}: target_parameters must be a list of parameter names, got {names!r}")
    try:
        probe = LoraConfig(
            r=int(conf["r"]),
            alpha=float(conf.get("lora_alpha", 8)),
            dropout=float(conf.get("lora_dropout") or 0.0),
            target_modules=(),
            target_parameters=names,
            use_rslora=bool(conf.get("use_rslora", False)),
            rank_pattern=conf.get("rank_pattern") or {},
            alpha_pattern=conf.get("alpha_pattern") or {},
        )
        adapters = param_adapters(cfg, probe)
    except UserError as err:
        raise UserError(f"{where}: {str(err).removeprefix('lora.')}") from None
    chosen = [t for t, _, _ in adapters]
    out, keys = {}, set()
    for t, r, alpha in adapters:
        lead = (t.experts,) if t.experts else ()
        a_all = np.zeros((cfg.num_layers, *lead, t.in_features, r), np.float32)
        b_all = np.zeros((cfg.num_layers, *lead, r, t.out_features), np.float32)
        rows = r * (t.experts or 1)
        for i in range(cfg.num_layers):
            ka, kb = param_peft_key(t, chosen, i, "A"), param_peft_key(t, chosen, i, "B")
            for key, want in ((ka, (rows, t.in_features)), (kb, (t.out_features, rows))):
                if key not in st.names():
                    raise UserError(f"{weights}: tensor {key} is missing (target_parameters {names})")
                if tuple(st.shape(key)) != want:
                    raise UserError(
                        f"{weights}: tensor {key} has shape {list(st.shape(key))} but this model needs "
                        f"{list(want)} (r={r}): the adapter is for a different base model"
                    )
            a, b = param_from_peft(t, np.asarray(st.get(ka), np.float32), np.asarray(st.get(kb), np.float32))
            a_all[i], b_all[i] = a, b
            keys.update((ka, kb))
        out[t.key] = {"a": jax.numpy.asarray(a_all), "b": jax.numpy.asarray(b_all)}
        factor = param_scale_factor(probe, r, alpha)
        if factor != 1.0:
            out[t.key]["s"] = jax.numpy.full((cfg.num_layers,), factor, jax.numpy.float32)
    return out, keys
