"""PEFT adapters in and out: `adapter_config.json` and `adapter_model.safetensors`, as PEFT writes them.

Layout (what `PeftModel.save_pretrained` writes for a causal LM; module names from `models.spec`):

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.{hf module}.lora_A.weight  [r, in]   = A[l].T
                                 base_model.model.{hf module}.lora_B.weight  [out, r]  = B[l].T

e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. GPT-2's Conv1D layers store their
base weight as [in, out] (`fan_in_fan_out: true`), but PEFT's lora_A/lora_B are plain `nn.Linear`s there
too, so the adapter tensors have the same [r, in] / [out, r] shapes for every family. Only the adapted
layers (`layers_to_transform`) are written. Trainable token rows, modules_to_save copies and a resized
vocabulary's embedding layers are the file's embedding side (`jaxlora.peft.embeddings`); MoE experts are
PEFT `target_parameters` (`jaxlora.peft.experts`).
"""

from pathlib import Path

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, matching_paths
from jaxlora.lora.adapters import layout, pattern_value
from jaxlora.lora.pissa import convert_to_lora, is_base_changing
from jaxlora.lora.tokens import MODULES, layer_groups
from jaxlora.models.config import DecoderConfig
from jaxlora.models.safetensors_io import SafetensorsFile
from jaxlora.models.saving import prepare_out_dir
from jaxlora.models.targets import LinearModule, linear_dims, linear_modules, param_targets, target_names
from jaxlora.peft.embeddings import embedding_tensors, read_embeddings
from jaxlora.peft.experts import (
    param_config,
    param_peft_key,
    param_target_names,
    param_to_peft,
    read_param_targets,
)
from jaxlora.peft.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    peft_adapter_config,
    read_adapter_config,
    write_adapter_files,
)
from jaxlora.peft.text_tower import TowerAdapterFile, tower_adapter, tower_matches

PEFT_PREFIX = "base_model.model."


def check_peft_export(cfg: DecoderConfig, lora_cfg: LoraConfig) -> None:
    """Refuse, from config.json alone, a run whose adapter `save_peft_adapter` could not write: the LoRA
    layouts PEFT cannot express (targets that match nothing, layer rules, MoE options;
    `jaxlora.lora.adapters.layout`). A run calls it before loading any weights."""
    layout(cfg, lora_cfg)


def check_lora_fits(cfg: DecoderConfig, lora: dict, lora_cfg: LoraConfig) -> None:
    """Refuse a LoRA tree (a run's checkpoint) that does not fit model `cfg`: modules it lacks, shapes
    other than its dimensions; from config.json alone, so before a merged export loads the weights."""
    ranks, dims = layout(cfg, lora_cfg).ranks, linear_dims(cfg)
    for path in _ordered_paths(cfg, layer_groups(lora)):
        r = int(ranks[path].max()) if path in ranks else int(lora_cfg.r)
        rows = len(_modules_by_path(cfg)[path].layers)  # L, or a hybrid model's mixer's L_kind
        _check_leaf(lora[path[0]][path[1]], path, dims[path], r, rows, lora_cfg)


def peft_key(module: LinearModule, layer: int, which: str) -> str:
    """PEFT's tensor name for one layer's `lora_A` / `lora_B` weight (`which` is "A" or "B"), or with
    `which` "m" its DoRA `lora_magnitude_vector`."""
    if which == "m":
        return f"{PEFT_PREFIX}{module.hf_prefix.format(i=layer)}.lora_magnitude_vector"
    if which == "b":  # lora_bias
        return f"{PEFT_PREFIX}{module.hf_prefix.format(i=layer)}.lora_B.bias"
    return f"{PEFT_PREFIX}{module.hf_prefix.format(i=layer)}.lora_{which}.weight"


def _modules_by_path(cfg: DecoderConfig) -> dict[tuple[str, str], LinearModule]:
    return {m.key: m for m in linear_modules(cfg)}


def peft_target_names(cfg: DecoderConfig, paths) -> list[str]:
    """PEFT `target_modules` naming exactly these (group, name) modules (see `models.spec.target_names`)."""
    return target_names(cfg, paths)


def _ordered_paths(cfg: DecoderConfig, lora: dict) -> list[tuple[str, str]]:
    """The (group, name) pairs present in `lora`, in name-table order; unknown ones are an error."""
    mods = _modules_by_path(cfg)
    params = {t.key for t in param_targets(cfg)}
    present = [(g, n) for g, sub in layer_groups(lora).items() for n in sub if (g, n) not in params]
    unknown = [f"{g}.{n}" for g, n in present if (g, n) not in mods]
    if unknown:
        raise UserError(f"LoRA tree has modules {unknown} that this {cfg.model_type} model does not have")
    return [p for p in mods if p in present]


def save_peft_adapter(
    out_dir,
    lora: dict,
    lora_cfg: LoraConfig,
    cfg: DecoderConfig,
    base_model_name_or_path: str | None,
    overwrite: bool = False,
    initial_lora: dict | None = None,
    about: dict[str, str] | None = None,
) -> Path:
    """Write `lora` as a PyTorch PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    With a PiSSA/OLoRA `lora_cfg.init`, pass `initial_lora` (the adapter at step 0, `init_lora`'s) to
    write it converted as PEFT's `path_initial_model_for_weight_conversion` does: a plain LoRA of twice
    the rank that applies to the original base (see `jaxlora.lora.pissa`). Without it the adapter is
    written as is, for the residual base (`init_lora_weights: pissa`, as PEFT saves it).

    lora: {group: {name: {"a": [L, in, r], "b": [L, r, out]}}}; only the layers `lora_cfg` adapts are
    written, as float32 `lora_A.weight [r, in]` and `lora_B.weight [out, r]` (with `rank_pattern`, each
    layer's own r, the padding dropped), and with DoRA `lora_magnitude_vector [out]`.
    `base_model_name_or_path` is recorded for `PeftModel.from_pretrained` users. An existing non-empty
    `out_dir` is refused unless `overwrite` (then the two files are replaced; other files are left
    alone). `about` (a training run's: {"step": "3", "state": "interrupted by SIGINT at step 3"}) goes
    into the safetensors metadata as `jaxlora.<key>` and into a README.md. Returns the folder; `DiskFull`
    when the space runs out (the partial file removed). For the text tower of a multimodal checkpoint the
    adapter is written for the whole model (`jaxlora.peft.text_tower`).
    """
    paths = _ordered_paths(cfg, lora)
    chosen = [t for t in param_targets(cfg) if t.key[1] in lora.get(t.key[0], {})]
    if not paths and not chosen:
        raise UserError("the LoRA tree is empty: nothing to export")
    if initial_lora is not None:
        if not is_base_changing(lora_cfg.init):
            raise UserError("initial_lora is only for a PiSSA/OLoRA adapter (lora.init pissa*, olora)")
        ranks = layout(cfg, lora_cfg).ranks
        converted, lora_cfg = convert_to_lora(
            layer_groups(jax.device_get(lora)), jax.device_get(initial_lora), ranks, lora_cfg
        )
        lora = {**lora, **converted}
    mask = layout(cfg, lora_cfg).mask
    tensors = _module_tensors(cfg, jax.device_get(lora), lora_cfg, paths)
    config = peft_adapter_config(cfg, lora_cfg, paths, mask, base_model_name_or_path)
    if chosen:  # PEFT's target_parameters: experts and router
        param_config(config, cfg, lora_cfg, chosen)
        tensors.update(_param_tensors(cfg, lora, chosen))
    extra, extra_config = embedding_tensors(cfg, jax.device_get(lora))  # tokens, copies, a grown vocabulary
    tensors.update(extra)
    config.update(extra_config)
    if cfg.text_tower_of:  # names under model.language_model, targets that miss the other towers
        tensors = tower_adapter(cfg, tensors, config, paths, mask)
    out = prepare_out_dir(out_dir, overwrite)
    write_adapter_files(out, tensors, config, about)
    return out


def _module_tensors(cfg: DecoderConfig, lora: dict, lora_cfg: LoraConfig, paths) -> dict[str, np.ndarray]:
    """PEFT's tensors of the linear modules `paths`, for the layers `lora_cfg` adapts (shapes checked)."""
    lay = layout(cfg, lora_cfg)
    dims, mods = linear_dims(cfg), _modules_by_path(cfg)
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        leaf, module = lora[path[0]][path[1]], mods[path]
        per_layer = lay.ranks.get(path)
        r = int(per_layer.max()) if per_layer is not None else int(lora_cfg.r)
        _check_leaf(leaf, path, dims[path], r, len(module.layers), lora_cfg)
        a, b = np.asarray(leaf["a"], np.float32), np.asarray(leaf["b"], np.float32)
        for row, i in enumerate(module.layers):  # row: in the stack; i: the HF layer
            if not lay.mask[i]:
                continue
            r_i = int(per_layer[i]) if per_layer is not None else r
            tensors[peft_key(module, i, "A")] = np.ascontiguousarray(a[row, :, :r_i].T)  # [r, in]
            tensors[peft_key(module, i, "B")] = np.ascontiguousarray(b[row, :r_i].T)  # [out, r]
            if "m" in leaf:  # DoRA's lora_magnitude_vector [out]
                tensors[peft_key(module, i, "m")] = np.asarray(leaf["m"][row], np.float32)
            if "bias" in leaf:  # PEFT's lora_bias: lora_B.bias [out]
                tensors[peft_key(module, i, "b")] = np.asarray(leaf["bias"][row], np.float32)
    return tensors


def _check_leaf(leaf: dict, path, dims: tuple[int, int], r: int, n_layers: int, lora_cfg: LoraConfig) -> None:
    """One line naming the module whose arrays or leaves do not fit the model and `lora_cfg`."""
    group, name = path
    want_a, want_b = (n_layers, dims[0], r), (n_layers, r, dims[1])
    if np.shape(leaf["a"]) != want_a or np.shape(leaf["b"]) != want_b:
        raise UserError(
            f"LoRA {group}.{name} has A {list(np.shape(leaf['a']))} and B {list(np.shape(leaf['b']))}, "
            f"expected {list(want_a)} and {list(want_b)} for this model with r={r}"
        )
    if lora_cfg.use_dora != ("m" in leaf):
        raise UserError(
            f"LoRA {group}.{name} {'lacks' if lora_cfg.use_dora else 'has'} a DoRA magnitude ('m') but "
            f"lora.use_dora is {lora_cfg.use_dora}"
        )
    if ("bias" in leaf) != lora_cfg.lora_bias:
        raise UserError(
            f"LoRA {group}.{name} {'has' if 'bias' in leaf else 'lacks'} a lora_bias leaf ('bias') but "
            f"lora.lora_bias is {lora_cfg.lora_bias}"
        )


def _param_tensors(cfg: DecoderConfig, lora: dict, chosen) -> dict[str, np.ndarray]:
    """PEFT's tensors of the adapted MoE weights (`target_parameters`), every layer."""
    tensors = {}
    for t in chosen:
        leaf = lora[t.key[0]][t.key[1]]
        for i in range(cfg.num_layers):
            a, b = param_to_peft(
                t, np.asarray(leaf["a"][i], np.float32), np.asarray(leaf["b"][i], np.float32)
            )
            tensors[param_peft_key(t, chosen, i, "A")] = np.ascontiguousarray(a)
            tensors[param_peft_key(t, chosen, i, "B")] = np.ascontiguousarray(b)
    return tensors


def load_peft_adapter(adapter_dir, cfg: DecoderConfig) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter (saved by PyTorch PEFT or by `save_peft_adapter`) for model `cfg`.

    Returns (lora, lora_cfg): the float32 tree {group: {name: {"a": [L, in, r], "b": [L, r, out]}}} and a
    `LoraConfig` with PEFT's r, alpha, dropout and use_rslora, `target_modules` as the explicit list of
    modules found in the file and `layers_to_transform` as the layers found (null = all). Layers a module
    has no tensors for get A = B = 0, which adds exactly nothing and receives zero gradient, so the tree
    serves for generation and for further training alike. Use `lora_scale(cfg, lora_cfg)` with it.
    Raises UserError (one line) for missing files, non-LoRA or unsupported adapters, tensors that belong to
    no linear layer of this model, and shapes that differ from the model's (naming tensor and shapes).
    A multimodal checkpoint's text tower reads an adapter made for the whole model, less other towers'.
    """
    conf, folder, weights = _adapter_files(adapter_dir, cfg)
    st = SafetensorsFile(weights)
    if cfg.text_tower_of:
        st = TowerAdapterFile(st, weights)
    params_lora, param_keys = read_param_targets(conf, cfg, st, weights)
    extras, extra_keys = read_embeddings(conf, cfg, st, weights)  # tokens, copies, a grown vocabulary
    skip = set(param_keys) | set(extra_keys)
    found, rank_of = _read_module_tensors(conf, cfg, st, weights, skip)
    if not found and not params_lora:
        raise UserError(f"{weights}: no LoRA tensors found")
    lora, layers_seen = _module_tree(conf, cfg, found, rank_of, weights)
    for (group, name), leaf in params_lora.items():
        lora.setdefault(group, {})[name] = leaf
    if not found:  # only parameter adapters: every layer
        layers_seen[:] = True
    lora.update(extras)
    paths = [p for p in _modules_by_path(cfg) if p in found]
    try:
        lora_cfg = LoraConfig(
            r=int(conf["r"]),
            alpha=float(conf.get("lora_alpha", 8)),
            dropout=float(conf.get("lora_dropout") or 0.0),
            target_modules=tuple(peft_target_names(cfg, paths)),
            use_rslora=bool(conf.get("use_rslora", False)),
            init="gaussian" if conf.get("init_lora_weights") == "gaussian" else "default",
            layers_to_transform=None if layers_seen.all() else tuple(np.flatnonzero(layers_seen).tolist()),
            use_dora=bool(conf.get("use_dora")),
            lora_bias=bool(conf.get("lora_bias")),
            trainable_token_indices=tuple(conf.get("trainable_token_indices") or ()) or None,
            modules_to_save=tuple(conf["modules_to_save"]) if MODULES in extras else None,
            rank_pattern=conf.get("rank_pattern") or {},
            alpha_pattern=conf.get("alpha_pattern") or {},
            target_parameters=param_target_names([t for t in param_targets(cfg) if t.key in params_lora])
            or None,
        )
    except UserError as err:
        raise UserError(f"{folder / ADAPTER_CONFIG}: {err}") from None
    partial = [p for p in found if len(found[p]) != int(layers_seen.sum())]
    if lora_cfg.use_dora and partial:
        raise UserError(
            f"{weights}: DoRA modules {['.'.join(p) for p in partial]} are adapted in only some of the "
            "adapted layers; jaxlora adapts one set of layers for every DoRA module"
        )
    if lora_cfg.rank_pattern or lora_cfg.alpha_pattern:  # per-module scale; 0 where a module is absent
        for (g, n), s in layout(cfg, lora_cfg).factors.items():
            rows = list(_modules_by_path(cfg)[(g, n)].layers)  # [L], or a hybrid mixer's [L_kind]
            lora[g][n]["s"] = jax.numpy.asarray(s[rows] * np.isin(rows, list(found[(g, n)])))
    return lora, lora_cfg


def _adapter_files(adapter_dir, cfg: DecoderConfig) -> tuple[dict, Path, Path]:
    """(adapter_config.json's contents, the folder, its safetensors file), refused in one line when the
    weights are missing or the config's target_modules match nothing in this model."""
    conf = read_adapter_config(adapter_dir)
    folder = Path(conf.pop("_folder"))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UserError(
                f"{folder}: only adapter_model.bin (pickle) is present; re-save it with "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
            )
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} found")
    if cfg.text_tower_of and conf.get("target_modules"):  # names in the multimodal model
        if not tower_matches(cfg, conf["target_modules"]):
            raise UserError(
                f"{folder / ADAPTER_CONFIG}: target_modules {conf['target_modules']!r} matches no linear "
                f"layer of this {cfg.text_tower_of} model's language model"
            )
    elif conf.get("target_modules"):
        try:
            matching_paths(cfg, conf["target_modules"])
        except UserError as err:
            raise UserError(f"{folder / ADAPTER_CONFIG}: {str(err).removeprefix('lora.')}") from None
    return conf, folder, weights


def _which(conf: dict) -> str:
    """The tensors each adapted layer has: A, B, and DoRA's "m" and lora_bias's "b" when configured."""
    return "AB" + ("m" if conf.get("use_dora") else "") + ("b" if conf.get("lora_bias") else "")


def _read_module_tensors(conf: dict, cfg: DecoderConfig, st: SafetensorsFile, weights: Path, skip: set):
    """({module key: {layer: {"A"|"B"|"m"|"b": array}}}, {(module key, layer): rank}) of the linear modules'
    tensors, each shape checked against the model and the layer's rank (rank_pattern, else r)."""
    r, dims, rank_pattern = int(conf["r"]), linear_dims(cfg), conf.get("rank_pattern") or {}
    where: dict[str, tuple[tuple[str, str], int, str]] = {}
    rank_of: dict[tuple[tuple[str, str], int], int] = {}
    for path, m in _modules_by_path(cfg).items():
        for i in m.layers:
            rank_of[(path, i)] = int(pattern_value(rank_pattern, m.hf_prefix.format(i=i), r))
            for which in _which(conf):
                where[peft_key(m, i, which)] = (path, i, which)
    found: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = {}
    for key in st.names():
        if key in skip:
            continue
        if key not in where:
            raise UserError(
                f"{weights}: tensor {key} is not the LoRA A/B weight of a linear layer of this "
                f"{cfg.model_type} model ({cfg.num_layers} layers); was the adapter made for another model?"
            )
        path, i, which = where[key]
        fan_in, fan_out = dims[path]
        r_i = rank_of[(path, i)]
        want = {"A": (r_i, fan_in), "B": (fan_out, r_i), "m": (fan_out,), "b": (fan_out,)}[which]
        if tuple(st.shape(key)) != want:
            raise UserError(
                f"{weights}: tensor {key} has shape {list(st.shape(key))} but this model needs {list(want)} "
                f"(r={r_i}, {path[1]} is {fan_in} -> {fan_out}): the adapter is for a different base model"
            )
        found.setdefault(path, {}).setdefault(i, {})[which] = st.get(key)
    return found, rank_of


def _module_tree(conf: dict, cfg: DecoderConfig, found: dict, rank_of: dict, weights: Path):
    """(the LoRA tree of the linear modules found, [L] bool of the layers any module has): stacked
    [L, ...] arrays, zero for the layers a module lacks, smaller layer ranks zero-padded."""
    n_layers, dims, mods = cfg.num_layers, linear_dims(cfg), _modules_by_path(cfg)
    lora: dict = {}
    layers_seen = np.zeros(n_layers, bool)
    for path in [p for p in mods if p in found]:
        fan_in, fan_out = dims[path]
        r_mod = max(rank_of[(path, i)] for i in found[path])
        rows = len(mods[path].layers)  # L, or a hybrid model's mixer's L_kind
        arrays = {
            "A": np.zeros((rows, fan_in, r_mod), np.float32),
            "B": np.zeros((rows, r_mod, fan_out), np.float32),
            "m": np.zeros((rows, fan_out), np.float32),
            "b": np.zeros((rows, fan_out), np.float32),
        }
        for i, tensors in found[path].items():
            missing = [w for w in _which(conf) if w not in tensors]
            if missing:
                raise UserError(f"{weights}: tensor {peft_key(mods[path], i, missing[0])} is missing")
            r_i, row = rank_of[(path, i)], mods[path].layers.index(i)
            arrays["A"][row, :, :r_i] = np.asarray(tensors["A"], np.float32).T
            arrays["B"][row, :r_i] = np.asarray(tensors["B"], np.float32).T
            for w in _which(conf)[2:]:
                arrays[w][row] = np.asarray(tensors[w], np.float32)
            layers_seen[i] = True
        names = {"A": "a", "B": "b", "m": "m", "b": "bias"}
        lora.setdefault(path[0], {})[path[1]] = {names[w]: jax.numpy.asarray(arrays[w]) for w in _which(conf)}
    return lora, layers_seen
