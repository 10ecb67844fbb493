"""An adapter folder, local or on the hub, and its `adapter_config.json` checked to be a LoRA adapter that
jaxlora runs; its files written (`peft_adapter_config`, `write_adapter_files`: the weights, the config, a
README.md)."""

import json
import os
import re
from pathlib import Path

import numpy as np

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig
from jaxlora.models.safetensors_io import write_safetensors
from jaxlora.models.saving import DiskFull, out_of_space
from jaxlora.models.targets import linear_modules, target_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")  # PEFT inits that rewrite the base


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

    Raises UserError for a missing or broken file, a `peft_type` other than LORA, and LoRA variants jaxlora
    does not run: `bias` other than "none", `lora_bias` with DoRA, `layer_replication`, trainable tokens of
    other layers than the input embedding, adapters for a changed base (PiSSA/OLoRA/CorDA/LoftQ).
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
    if conf.get("bias", "none") != "none":
        problems.append(f"bias {conf['bias']!r} (only 'none')")
    if conf.get("lora_bias") and conf.get("use_dora"):
        problems.append("lora_bias with use_dora")
    if conf.get("layer_replication"):
        problems.append("layer_replication")
    tokens = conf.get("trainable_token_indices")
    if isinstance(tokens, dict) and len(tokens) == 1 and next(iter(tokens)) in ("embed_tokens", "wte"):
        conf["trainable_token_indices"] = tokens = next(iter(tokens.values()))
    if tokens and not (isinstance(tokens, list) and all(isinstance(i, int) for i in tokens)):
        problems.append(f"trainable_token_indices {tokens} (only a list of ids for the input embedding)")
    init = conf.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights {init!r} (it changes the base weights)")
    if problems:
        raise UserError(f"{path}: unsupported LoRA adapter: {'; '.join(problems)}")
    if not isinstance(conf.get("r"), int) or conf["r"] <= 0:
        raise UserError(f"{path}: r must be a positive integer, got {conf.get('r')!r}")
    conf["_folder"] = str(folder)
    return conf


def peft_adapter_config(
    cfg: DecoderConfig, lora_cfg, paths, mask: np.ndarray, base_model_name_or_path: str | None
) -> dict:
    """The `adapter_config.json` contents: the keys PEFT 0.21 writes, with their defaults where unused;
    `paths` the adapted (group, name) modules, `mask` [L] bool the adapted layers.

    Keys added in recent PEFT releases that default to null are left out, so older PEFT versions load the
    file without "unexpected keyword" warnings; PEFT fills them with the same defaults.
    """
    layers = None if mask.all() else np.flatnonzero(mask).tolist()
    init = lora_cfg.init
    return {
        "alpha_pattern": dict(lora_cfg.alpha_pattern or {}),
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none",
        "corda_config": None,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in linear_modules(cfg)),
        "inference_mode": True,
        "init_lora_weights": True if init == "default" else init,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": layers,
        "loftq_config": {},
        "lora_alpha": lora_cfg.alpha,
        "lora_bias": bool(lora_cfg.lora_bias),
        "lora_dropout": float(lora_cfg.dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(lora_cfg.r),
        "rank_pattern": dict(lora_cfg.rank_pattern or {}),
        "revision": None,
        "target_modules": target_names(cfg, paths),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": bool(lora_cfg.use_dora),
        "use_rslora": bool(lora_cfg.use_rslora),
    }


def write_adapter_files(out: Path, tensors: dict, config: dict, about: dict[str, str] | None) -> None:
    """The weights (replaced atomically), adapter_config.json and, with `about`, README.md."""
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    meta = {"format": "pt", **{f"jaxlora.{k}": str(v) for k, v in (about or {}).items()}}
    try:
        write_safetensors(tmp, tensors, metadata=meta)
        os.replace(tmp, out / ADAPTER_WEIGHTS)
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if about is not None:
            (out / "README.md").write_text(_readme(config, about))
    except OSError as err:
        if not out_of_space(err):
            raise
        tmp.unlink(missing_ok=True)
        raise DiskFull("writing the adapter", out, sum(t.nbytes for t in tensors.values())) from None


def _readme(config: dict, about: dict[str, str]) -> str:
    """A short model card: what the adapter is for, and where in its training run it comes from."""
    lines = [
        "# LoRA adapter (PEFT format), written by jaxlora",
        "",
        f"- base model: {config['base_model_name_or_path']}",
        *(f"- {key}: {value}" for key, value in about.items()),
        "",
        "Load it with `peft.PeftModel.from_pretrained(base, this_folder)`.",
    ]
    return "\n".join(lines) + "\n"
