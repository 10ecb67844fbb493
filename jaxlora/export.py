"""PEFT adapters in and out, and merged Hugging Face checkpoints.

PEFT layout (what `PeftModel.save_pretrained` writes for a causal LM; names from `models.names`):

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.{hf module}.lora_A.weight  [r, in]   = A[l].T
                                 base_model.model.{hf module}.lora_B.weight  [out, r]  = B[l].T

e.g. `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. GPT-2's Conv1D layers store their
base weight as [in, out] (`fan_in_fan_out: true`), but PEFT's lora_A/lora_B are plain `nn.Linear`s there
too, so the adapter tensors have the same [r, in] / [out, r] shapes for every family. Only the adapted
layers (`layers_to_transform`) are written.

A merged checkpoint is the base with `W + scale * A @ B` folded in, written under HF names and layouts by
the same name table the loader reads (torch `Linear` weights transposed back to [out, in], GPT-2 Conv1D
kept [in, out]), with config.json and the tokenizer files copied, so transformers loads it as a plain model.
"""

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, layer_mask, lora_scale, matching_paths
from jaxlora.models.config import DecoderConfig, config_from_hf, read_hf_config
from jaxlora.models.loading import DTYPES, Model, load_model, resolve_model_path
from jaxlora.models.names import LINEAR, LinearModule, hf_shape, linear_dims, linear_modules, name_table
from jaxlora.models.safetensors_io import SafetensorsFile, write_safetensors
from jaxlora.quant import QuantizedTensor, dequantize, make_quantizer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size
# init_lora_weights values whose adapters only make sense with a changed base (not plain LoRA).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")


def peft_key(module: LinearModule, layer: int, which: str) -> str:
    """PEFT's tensor name for one layer's `lora_A` / `lora_B` weight (`which` is "A" or "B")."""
    return f"{PEFT_PREFIX}{module.hf_prefix.format(i=layer)}.lora_{which}.weight"


def _modules_by_path(cfg: DecoderConfig) -> dict[tuple[str, str], LinearModule]:
    return {(m.path[1], m.path[2]): m for m in linear_modules(cfg)}


def peft_target_names(cfg: DecoderConfig, paths) -> list[str]:
    """PEFT `target_modules` naming exactly these (group, name) modules, as suffixes PEFT matches.

    The plain module name (`q_proj`) unless another, untargeted module shares it (GPT-2's attn/mlp
    `c_proj`), then the last two parts (`attn.c_proj`).
    """
    mods = _modules_by_path(cfg)
    chosen = [mods[p] for p in paths]
    out: list[str] = []
    for m in chosen:
        clash = any(o.name == m.name and o not in chosen for o in mods.values())
        name = ".".join(m.hf_prefix.split(".")[-2:]) if clash else m.name
        if name not in out:
            out.append(name)
    return out


def _prepare_out(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} already exists and is not empty; "
            "pass overwrite=True (--overwrite) to write into it"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _ordered_paths(cfg: DecoderConfig, lora: dict) -> list[tuple[str, str]]:
    """The (group, name) pairs present in `lora`, in name-table order; unknown ones are an error."""
    mods = _modules_by_path(cfg)
    present = [(g, n) for g, sub in lora.items() for n in sub]
    unknown = [f"{g}.{n}" for g, n in present if (g, n) not in mods]
    if unknown:
        raise UserError(f"LoRA tree has modules {unknown} that this {cfg.model_type} model does not have")
    return [p for p in mods if p in present]


def peft_adapter_config(
    cfg: DecoderConfig, lora_cfg, paths, mask: np.ndarray, base_model_name_or_path: str | None
) -> dict:
    """The `adapter_config.json` contents: the keys PEFT 0.21 writes, with their defaults where unused.

    Keys added in recent PEFT releases that default to null are left out, so older PEFT versions load the
    file without "unexpected keyword" warnings; PEFT fills them with the same defaults.
    """
    layers = None if mask.all() else np.flatnonzero(mask).tolist()
    init = getattr(lora_cfg, "init", "default")
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none",
        "corda_config": None,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": cfg.model_type == "gpt2",
        "inference_mode": True,
        "init_lora_weights": True if init == "default" else init,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": layers,
        "loftq_config": {},
        "lora_alpha": lora_cfg.alpha,
        "lora_bias": False,
        "lora_dropout": float(lora_cfg.dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(lora_cfg.r),
        "rank_pattern": {},
        "revision": None,
        "target_modules": peft_target_names(cfg, paths),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": bool(getattr(lora_cfg, "use_rslora", False)),
    }


def save_peft_adapter(
    out_dir,
    lora: dict,
    lora_cfg,
    cfg: DecoderConfig,
    base_model_name_or_path: str | None,
    overwrite: bool = False,
) -> Path:
    """Write `lora` as a PyTorch PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    lora: {group: {name: {"a": [L, in, r], "b": [L, r, out]}}}; only the layers `lora_cfg` adapts are
    written, as float32 `lora_A.weight [r, in]` and `lora_B.weight [out, r]`. `base_model_name_or_path` is
    recorded for `PeftModel.from_pretrained` users. An existing non-empty `out_dir` is refused unless
    `overwrite` (then the two files are replaced; other files are left alone). Returns the folder.
    """
    paths = _ordered_paths(cfg, lora)
    if not paths:
        raise UserError("the LoRA tree is empty: nothing to export")
    mask = layer_mask(cfg, lora_cfg)
    r, dims, mods = int(lora_cfg.r), linear_dims(cfg), _modules_by_path(cfg)
    tensors: dict[str, np.ndarray] = {}
    for group, name in paths:
        fan_in, fan_out = dims[(group, name)]
        a = np.asarray(jax.device_get(lora[group][name]["a"]), np.float32)
        b = np.asarray(jax.device_get(lora[group][name]["b"]), np.float32)
        want_a, want_b = (cfg.num_layers, fan_in, r), (cfg.num_layers, r, fan_out)
        if a.shape != want_a or b.shape != want_b:
            raise UserError(
                f"LoRA {group}.{name} has A {list(a.shape)} and B {list(b.shape)}, expected {list(want_a)} "
                f"and {list(want_b)} for this model with r={r}"
            )
        for i in np.flatnonzero(mask):
            tensors[peft_key(mods[(group, name)], i, "A")] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[peft_key(mods[(group, name)], i, "B")] = np.ascontiguousarray(b[i].T)  # [out, r]
    config = peft_adapter_config(cfg, lora_cfg, paths, mask, base_model_name_or_path)
    out = _prepare_out(out_dir, overwrite)
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    write_safetensors(tmp, tensors, metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _adapter_folder(adapter_dir) -> Path:
    """A local folder as is; a hub id is downloaded (adapter files only)."""
    folder = Path(os.path.expanduser(str(adapter_dir)))
    if folder.is_dir():
        return folder
    text = str(adapter_dir)
    if text.startswith((".", "/", "~")) or folder.exists() or not re.match(r"^[\w.-]+/[\w.-]+$", text):
        raise UserError(f"adapter folder not found: {adapter_dir}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except Exception as err:  # offline, unknown repo, gated, ...
        raise UserError(
            f"adapter folder not found: {adapter_dir} (and downloading it from the hub failed: "
            f"{type(err).__name__})"
        ) from None


def read_adapter_config(adapter_dir) -> dict:
    """The adapter's `adapter_config.json`, checked to be a plain LoRA adapter jaxlora can run.

    Raises UserError for a missing or broken file, a `peft_type` other than LORA, and LoRA variants that
    change the computation or the base: DoRA, `bias` other than "none", `lora_bias`, `modules_to_save`,
    per-module `rank_pattern`/`alpha_pattern`, `layer_replication`, trainable tokens, PiSSA/OLoRA/CorDA/LoftQ.
    """
    folder = _adapter_folder(adapter_dir)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; is this a PEFT adapter folder?")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(conf, dict):
        raise UserError(f"{path}: expected a JSON object")
    peft_type = conf.get("peft_type")
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    problems = []
    if conf.get("use_dora"):
        problems.append("DoRA (use_dora: true)")
    if conf.get("bias", "none") != "none":
        problems.append(f"bias {conf['bias']!r} (only 'none')")
    if conf.get("lora_bias"):
        problems.append("lora_bias: true")
    if conf.get("modules_to_save"):
        problems.append(f"modules_to_save {conf['modules_to_save']}")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        problems.append("per-module rank_pattern/alpha_pattern")
    if conf.get("layer_replication"):
        problems.append("layer_replication")
    if conf.get("trainable_token_indices"):
        problems.append("trainable_token_indices")
    if conf.get("target_parameters"):
        problems.append("target_parameters")
    init = conf.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights {init!r} (it changes the base weights)")
    if problems:
        raise UserError(f"{path}: unsupported LoRA adapter: {'; '.join(problems)}")
    if not isinstance(conf.get("r"), int) or conf["r"] <= 0:
        raise UserError(f"{path}: r must be a positive integer, got {conf.get('r')!r}")
    conf["_folder"] = str(folder)
    return conf


def load_peft_adapter(adapter_dir, cfg: DecoderConfig) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter (saved by PyTorch PEFT or by `save_peft_adapter`) for model `cfg`.

    Returns (lora, lora_cfg): the float32 tree {group: {name: {"a": [L, in, r], "b": [L, r, out]}}} and a
    `LoraConfig` with PEFT's r, alpha, dropout and use_rslora, `target_modules` as the explicit list of
    modules found in the file and `layers_to_transform` as the layers found (null = all). Layers a module
    has no tensors for get A = B = 0, which adds exactly nothing and receives zero gradient, so the tree
    serves for generation and for further training alike. Use `lora_scale(cfg, lora_cfg)` with it.
    Raises UserError (one line) for missing files, non-LoRA or unsupported adapters, tensors that belong to
    no linear layer of this model, and shapes that differ from the model's (naming tensor and shapes).
    """
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
    if conf.get("target_modules"):
        try:
            matching_paths(cfg, conf["target_modules"])
        except UserError as err:
            raise UserError(f"{folder / ADAPTER_CONFIG}: {str(err).removeprefix('lora.')}") from None
    st = SafetensorsFile(weights)
    r, n_layers, dims = int(conf["r"]), cfg.num_layers, linear_dims(cfg)
    where: dict[str, tuple[tuple[str, str], int, str]] = {}
    for path, m in _modules_by_path(cfg).items():
        for i in range(n_layers):
            for which in "AB":
                where[peft_key(m, i, which)] = (path, i, which)

    found: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = {}
    for key in st.names():
        if key not in where:
            raise UserError(
                f"{weights}: tensor {key} is not the LoRA A/B weight of a linear layer of this "
                f"{cfg.model_type} model ({cfg.num_layers} layers); was the adapter made for another model?"
            )
        path, i, which = where[key]
        fan_in, fan_out = dims[path]
        want = (r, fan_in) if which == "A" else (fan_out, r)
        got = st.shape(key)
        if tuple(got) != want:
            raise UserError(
                f"{weights}: tensor {key} has shape {list(got)} but this model needs {list(want)} "
                f"(r={r}, {path[1]} is {fan_in} -> {fan_out}): the adapter is for a different base model"
            )
        found.setdefault(path, {}).setdefault(i, {})[which] = st.get(key)
    if not found:
        raise UserError(f"{weights}: no LoRA tensors found")

    lora: dict = {}
    layers_seen = np.zeros(n_layers, bool)
    for path in [p for p in _modules_by_path(cfg) if p in found]:
        fan_in, fan_out = dims[path]
        a = np.zeros((n_layers, fan_in, r), np.float32)
        b = np.zeros((n_layers, r, fan_out), np.float32)
        for i, pair in found[path].items():
            if set(pair) != {"A", "B"}:
                missing = peft_key(_modules_by_path(cfg)[path], i, "B" if "A" in pair else "A")
                raise UserError(f"{weights}: tensor {missing} is missing")
            a[i] = np.asarray(pair["A"], np.float32).T
            b[i] = np.asarray(pair["B"], np.float32).T
            layers_seen[i] = True
        lora.setdefault(path[0], {})[path[1]] = {"a": jax.numpy.asarray(a), "b": jax.numpy.asarray(b)}

    paths = [p for p in _modules_by_path(cfg) if p in found]
    try:
        lora_cfg = LoraConfig(
            r=r,
            alpha=float(conf.get("lora_alpha", 8)),
            dropout=float(conf.get("lora_dropout") or 0.0),
            target_modules=tuple(peft_target_names(cfg, paths)),
            use_rslora=bool(conf.get("use_rslora", False)),
            init="gaussian" if conf.get("init_lora_weights") == "gaussian" else "default",
            layers_to_transform=None if layers_seen.all() else tuple(np.flatnonzero(layers_seen).tolist()),
        )
    except UserError as err:
        raise UserError(f"{folder / ADAPTER_CONFIG}: {err}") from None
    return lora, lora_cfg


# ----------------------------------------------------------------------------------------------------------
# Merged export.


def _dense(leaf) -> np.ndarray:
    """A host float array from a dense or quantized (dequantized in float32) leaf."""
    if isinstance(leaf, QuantizedTensor):
        leaf = dequantize(leaf, np.float32)
    return np.asarray(jax.device_get(leaf))


def _hf_tensors(params: dict, cfg: DecoderConfig, np_dtype, lora: dict, scale: np.ndarray):
    """(HF name, bytes, producer) for every tensor of the HF checkpoint, in name-table order.

    A producer returns the tensor in HF layout and `np_dtype`; for a kernel in `lora` it adds
    `scale[i] * A[i] @ B[i]` to layer i in float32 on the host, one layer at a time, so the merge needs no
    second copy of the model on the device.
    """
    itemsize = np.dtype(np_dtype).itemsize
    for entry in name_table(cfg):
        leaf = params
        for key in entry.path:
            leaf = leaf[key]
        shape = hf_shape(entry, cfg)
        is_layer_kernel = entry.per_layer and entry.path[-1] == "kernel"
        ab = lora.get(entry.path[1], {}).get(entry.path[2]) if is_layer_kernel else None

        def produce(layer, leaf=leaf, entry=entry, shape=shape, ab=ab):
            arr = _dense(leaf if layer is None else jax.tree.map(lambda x: x[layer], leaf))
            if ab is not None:
                a = np.asarray(jax.device_get(ab["a"][layer]), np.float32)  # [in, r]
                b = np.asarray(jax.device_get(ab["b"][layer]), np.float32)  # [r, out]
                arr = arr.astype(np.float32) + np.float32(scale[layer]) * (a @ b)
            arr = arr.T if entry.layout == LINEAR else arr
            assert arr.shape == shape, (entry.hf_name(layer), arr.shape, shape)
            return np.ascontiguousarray(arr.astype(np_dtype))

        for i in range(cfg.num_layers) if entry.per_layer else [None]:
            yield entry.hf_name(i), int(np.prod(shape)) * itemsize, (lambda p=produce, i=i: p(i))


def _source_dtype(folder: Path) -> str:
    conf = read_hf_config(folder)
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def save_merged(
    out_dir,
    model: Model,
    lora: dict | None,
    lora_cfg,
    tokenizer_src=None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the base with the LoRA update merged in as a Hugging Face checkpoint folder.

    model.safetensors (sharded with an index above `max_shard_bytes`) holds every tensor of the name table
    in HF names and layouts; config.json and generation_config.json are copied from `model.path` (with the
    dtype field set), and the tokenizer files from `tokenizer_src` (default `model.path`). `dtype`:
    float32, bfloat16 or float16; default the source config.json's dtype. Quantized base kernels are
    dequantized and the update is added to the dequantized weights (the merged model is a plain float
    model). `lora=None` writes the (dequantized) base. Host memory peaks at one shard. Returns the folder.
    """
    cfg = model.config
    source = Path(model.path)
    dtype = dtype or _source_dtype(source)
    if dtype not in DTYPES:
        raise UserError(f"merged dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    lora = lora or {}
    scale = lora_scale(cfg, lora_cfg) if lora else np.zeros(cfg.num_layers, np.float32)
    for group, name in _ordered_paths(cfg, lora):
        a, b = lora[group][name]["a"], lora[group][name]["b"]
        kernel = model.params["layers"][group][name]["kernel"]
        if tuple(kernel.shape) != (*a.shape[:2], b.shape[-1]):
            raise UserError(
                f"LoRA for {group}.{name} has A {list(a.shape)} and B {list(b.shape)} but the kernel is "
                f"{list(kernel.shape)}: the adapter belongs to a different base model"
            )
    tok_src = Path(tokenizer_src) if tokenizer_src is not None else source
    if not tok_src.is_dir():
        tok_src = resolve_model_path(str(tokenizer_src))
    out = _prepare_out(out_dir, overwrite)

    tensors = list(_hf_tensors(model.params, cfg, DTYPES[dtype], lora, scale))
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        write_safetensors(out / fname, {name: make() for name, _, make in shard}, metadata={"format": "pt"})
        weight_map.update({name: fname for name, _, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t[1] for t in tensors)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    conf = read_hf_config(source)
    for key in ("dtype", "torch_dtype"):
        if key in conf:
            conf[key] = dtype
    conf.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copyfile(tok_src / name, out / name)
    return out


# ----------------------------------------------------------------------------------------------------------
# What scripts/export.py does.

FORMATS = ("peft", "merged")


def _model_hf_config(model: str) -> dict:
    """config.json of a local model folder, or of a hub model (downloading that file only)."""
    folder = Path(os.path.expanduser(model))
    if folder.is_dir():
        return read_hf_config(folder)
    try:
        from huggingface_hub import hf_hub_download

        return read_hf_config(Path(hf_hub_download(model, "config.json")).parent)
    except UserError:
        raise
    except Exception:  # not a hub id, offline, unknown or gated repo
        return read_hf_config(resolve_model_path(model))  # raises the loader's one-line error


def lora_from_run(run_dir) -> tuple:
    """The LoRA tree of a training run's latest checkpoint: `(run Config, lora tree, step)`.

    Reads `run_dir/config.yaml` (the resolved config the trainer saved) and restores only what is
    needed from `run_dir/checkpoints/<latest step>`.
    """
    from jaxlora.config import load_config
    from jaxlora.lora import init_lora
    from jaxlora.train.checkpoint import Checkpointer, rng_to_array
    from jaxlora.train.optim import make_optimizer

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: no config.yaml; is this a jaxlora run folder (train output_dir)?")
    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise UserError(f"{run}: no checkpoint under {ckpt_dir}")
    cfg = load_config(run / "config.yaml")
    mcfg = config_from_hf(_model_hf_config(cfg.model.path))
    key = jax.random.key(0)
    lora = init_lora(mcfg, cfg.lora, key)
    optimizer, _ = make_optimizer(cfg.train, 1)
    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep)
    try:
        step = ckpt.latest_step()
        like = {"lora": lora, "opt_state": optimizer.init(lora), "rng": rng_to_array(key)}
        state, _ = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return cfg, jax.tree.map(np.asarray, state["lora"]), step


def run_export(
    adapter: str | None,
    model: str | None,
    fmt: str,
    out: str,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    quant: str | None = None,
    quant_block_size: int | None = None,
    run: str | None = None,
) -> Path:
    """Export an adapter folder, or a training run's latest checkpoint, for base `model` as `fmt` into `out`.

    "peft": re-save the adapter in normalized PEFT form (explicit target list, float32 tensors, only the
    adapted layers), checked against the model's dimensions; only config.json is read. "merged": load the
    model, merge the adapter and write a full HF checkpoint (`dtype` as in `save_merged`). For an adapter
    trained on a quantized base (QLoRA), pass the training's `quant` ("int8"/"nf4") and `quant_block_size`:
    the base is quantized the same way and the update is added to those dequantized weights.
    With `run` (a training output_dir), the model and the quant settings default to the run's config.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    lora = lora_cfg = None
    if run is not None:
        run_cfg, lora, _ = lora_from_run(run)
        lora_cfg = run_cfg.lora
        model = model or run_cfg.model.path
        if quant is None:
            quant, quant_block_size = run_cfg.quant.weights, run_cfg.quant.block_size
    elif adapter is None:
        raise UserError("pass --adapter DIR (a PEFT LoRA adapter folder) or --run OUTPUT_DIR")
    else:
        read_adapter_config(adapter)  # fail on a bad adapter before loading any weights
    if model is None:
        raise UserError("pass --model PATH_OR_ID (the base model the adapter was trained on)")
    quant = quant or "none"
    if fmt == "peft":
        if quant != "none" and run is None:
            raise UserError("--quant applies to --format merged only")
        cfg = config_from_hf(_model_hf_config(model))
        if lora is None:
            lora, lora_cfg = load_peft_adapter(adapter, cfg)
        return save_peft_adapter(out, lora, lora_cfg, cfg, model, overwrite=overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    m = load_model(model, quantizer=make_quantizer(quant, quant_block_size))
    if lora is None:
        lora, lora_cfg = load_peft_adapter(adapter, m.config)
    return save_merged(out, m, lora, lora_cfg, dtype=dtype, overwrite=overwrite)


__all__ = [
    "lora_from_run",
    "load_peft_adapter",
    "peft_adapter_config",
    "peft_key",
    "peft_target_names",
    "read_adapter_config",
    "run_export",
    "save_merged",
    "save_peft_adapter",
]
