"""Run configuration: nested YAML -> frozen, typed dataclasses, with dotted overrides and validation.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=3", "lora.target_modules=[q_proj,v_proj]"])
    save_config(cfg, run_dir / "config.yaml")   # load_config of that file gives an equal Config

Every section is a frozen, keyword-only dataclass whose `__post_init__` coerces and checks its own
fields, so a section built in code is validated exactly like one read from YAML. Lists are stored as
tuples and mappings as `FrozenDict`, so a `Config` is hashable. Every mistake raises `UserError` with one
line naming the dotted key. `docs/configuration.md` lists every key; `python -m jaxlora.config` prints
its tables from the dataclasses.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from jaxlora.data.formats import FORMAT_FIELDS
from jaxlora.errors import UserError

__all__ = [
    "FORMAT_FIELDS",
    "CheckpointSection",
    "Config",
    "DataConfig",
    "DataSource",
    "DistributedSection",
    "FrozenDict",
    "LoggingSection",
    "LoraSection",
    "MeshSection",
    "ModelSection",
    "ParallelSection",
    "QuantSection",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "reference_markdown",
    "save_config",
]

# Enumerations (YAML strings).
DType = Literal["float32", "bfloat16"]
Attention = Literal["xla", "cudnn"]
QuantWeights = Literal["none", "int8", "nf4"]
LoraInit = Literal["default", "gaussian"]
DataFormat = Literal["alpaca", "chat", "prompt_completion", "text"]
LrSchedule = Literal["cosine", "linear", "constant"]
Remat = Literal["none", "dots", "full"]
Resume = Literal["auto", "never", "always"]
Strategy = Literal["auto", "single", "pmap", "mesh"]

_NONE = type(None)
# Dotted path of the section being built by the loader, e.g. "data.train[0]"; None outside it.
_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxlora_config_where", default=None)


class FrozenDict(dict):
    """A read-only, hashable `dict` (used for `DataSource.fields`)."""

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("FrozenDict is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))


# ----------------------------------------------------------------------------------------------------
# Field helpers and the shared section behaviour


def _req(doc: str) -> Any:
    """A required field with its one-line meaning."""
    return dataclasses.field(metadata={"help": doc})


def _opt(default: Any, doc: str) -> Any:
    """A field with a default and its one-line meaning."""
    return dataclasses.field(default=default, metadata={"help": doc})


def _sub(cls: type, doc: str) -> Any:
    """A nested section that defaults to its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": doc})


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


class _Section:
    """Coerces and validates fields after `__init__`; errors name keys under the section's dotted path."""

    _prefix: ClassVar[str] = ""  # dotted path used when the section is built directly in code

    def __post_init__(self) -> None:
        where = _WHERE.get()
        where = self._prefix if where is None else where
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _convert(getattr(self, f.name), hints[f.name], _join(where, f.name))
            object.__setattr__(self, f.name, value)
        self._check(where)

    def _check(self, where: str) -> None:
        """Cross-field checks of one section (overridden per section)."""

    # Small checks that raise a one-line UserError naming the key; null values pass.
    def _ge(self, where: str, name: str, low: float) -> None:
        value = getattr(self, name)
        if value is not None and value < low:
            raise UserError(f"{_join(where, name)} must be >= {low}, got {value}")

    def _gt(self, where: str, name: str, low: float) -> None:
        value = getattr(self, name)
        if value is not None and not value > low:
            raise UserError(f"{_join(where, name)} must be > {low}, got {value}")

    def _in_unit(self, where: str, name: str, closed: bool = False) -> None:
        value = getattr(self, name)
        if value is not None and not (0 <= value <= 1 if closed else 0 <= value < 1):
            raise UserError(f"{_join(where, name)} must be in [0, 1{']' if closed else ')'}, got {value}")

    def _non_empty(self, where: str, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not value.strip():
            raise UserError(f"{_join(where, name)} must not be empty")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML-safe); `config_from_dict` of it gives an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore

    def to_yaml(self) -> str:
        """The section as YAML text, keys in declaration order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


_section = dataclasses.dataclass(frozen=True, kw_only=True)


# ----------------------------------------------------------------------------------------------------
# Sections


@_section
class ModelSection(_Section):
    """The base model to fine-tune."""

    _prefix = "model"

    path: str = _req("HF hub id (org/name) or local folder with config.json and safetensors")
    revision: str | None = _opt(None, "hub branch, tag or commit; null = the default branch")
    tokenizer: str | None = _opt(None, "hub id or folder of the tokenizer; null = model.path")
    dtype: DType = _opt("float32", "storage dtype of the base parameters")
    compute_dtype: DType | None = _opt(None, "dtype of activations and matmuls; null = model.dtype")
    attention: Attention = _opt("xla", "attention kernel: plain XLA or cuDNN flash attention (GPU only)")
    allow_pickle: bool = _opt(False, "permit loading pytorch_model.bin (pickle; runs code) if no safetensors")
    random_init: bool = _opt(
        False, "ignore any weights: random base from config.json, seeded by `seed` (smoke tests, benchmarks)"
    )

    def _check(self, where: str) -> None:
        self._non_empty(where, "path")
        self._non_empty(where, "revision")
        self._non_empty(where, "tokenizer")


@_section
class QuantSection(_Section):
    """Quantization of the frozen base weights."""

    _prefix = "quant"

    weights: QuantWeights = _opt("none", "quantize frozen base weights: none, int8 or 4-bit NormalFloat")
    block_size: int | None = _opt(
        None, "values per quantization scale; null = per output channel (int8) or 64 (nf4)"
    )
    skip: tuple[str, ...] = _opt(("lm_head", "embed_tokens"), "module names kept unquantized")

    def _check(self, where: str) -> None:
        self._ge(where, "block_size", 1)
        if any(not s.strip() for s in self.skip):
            raise UserError(f"{where}.skip must not contain empty names, got {list(self.skip)}")


@_section
class LoraSection(_Section):
    """The LoRA adapters: `W x + (alpha / r) * B A dropout(x)`."""

    _prefix = "lora"

    r: int = _opt(8, "rank of each adapter")
    alpha: float = _opt(
        16.0, "scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)"
    )
    dropout: float = _opt(0.05, "dropout on the adapter input, in [0, 1)")
    target_modules: str | tuple[str, ...] = _opt(
        "all-linear",
        "list of module names (q_proj, ...), a regex full-matched against HF module paths, or all-linear",
    )
    use_rslora: bool = _opt(False, "rank-stabilized LoRA: scale by alpha / sqrt(r)")
    init: LoraInit = _opt(
        "default", "A init: default (Kaiming uniform, as PEFT) or gaussian (std 1/r); B = 0"
    )
    layers_to_transform: tuple[int, ...] | None = _opt(None, "decoder layer indices to adapt; null = all")

    def _check(self, where: str) -> None:
        self._ge(where, "r", 1)
        self._gt(where, "alpha", 0)
        self._in_unit(where, "dropout")
        key = f"{where}.target_modules"
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets.strip():
                raise UserError(f"{key} must not be empty; use all-linear, a list of names or a regex")
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as err:
                    raise UserError(f"{key} is not a valid regex ({err}): {targets!r}") from None
        elif not targets or any(not t.strip() for t in targets):
            raise UserError(f"{key} must be a non-empty list of module names, got {list(targets)}")
        layers = self.layers_to_transform
        if layers is not None and (not layers or min(layers) < 0):
            raise UserError(
                f"{where}.layers_to_transform must be null (all layers) or a non-empty list of "
                f"layer indices >= 0, got {list(layers)}"
            )


@_section
class DataSource(_Section):
    """One dataset: a local file/folder or a hub dataset, in one of the supported formats."""

    _prefix = "DataSource"

    path: str = _req("local .json/.jsonl/.parquet file or folder, or HF hub dataset id")
    format: DataFormat = _req("record layout: alpaca, chat (messages), prompt_completion or text")
    split: str | None = _opt(None, "hub dataset split; null = train")
    subset: str | None = _opt(None, "hub dataset configuration name; null = the default")
    fields: dict[str, str | dict[str, str]] | None = _opt(
        None, "rename map from the format's field names to this dataset's columns, e.g. {output: answer}"
    )
    streaming: bool = _opt(False, "stream the dataset instead of downloading it whole")

    def _check(self, where: str) -> None:
        self._non_empty(where, "path")
        if self.fields is not None:
            known = FORMAT_FIELDS[self.format]
            for name, column in self.fields.items():
                key = f"{where}.fields.{name}"
                if name not in known:
                    raise UserError(
                        f"{where}.fields: unknown field {name!r} for format {self.format}; "
                        f"known: {', '.join(known)}"
                    )
                if name == "roles":  # dataset role name -> system, user, assistant or tool
                    if not isinstance(column, Mapping):
                        raise UserError(f"{key} must map dataset role names to roles, got {_show(column)}")
                elif not isinstance(column, str) or not column.strip():
                    raise UserError(f"{key} must name a column, got {_show(column)}")


@_section
class DataConfig(_Section):
    """Datasets and how they become token batches."""

    _prefix = "data"

    train: tuple[DataSource, ...] = _req("training datasets, mixed in order")
    validation: tuple[DataSource, ...] = _opt((), "validation datasets; empty = split off data.train")
    validation_split: float = _opt(
        0.05, "fraction of data.train held out for validation when data.validation is empty, in [0, 1)"
    )
    seq_len: int = _opt(512, "tokens per training sequence")
    packing: bool = _opt(True, "pack several examples into each sequence (attention kept per example)")
    train_on_inputs: bool = _opt(False, "compute the loss on prompt tokens too, not only on responses")
    chat_template: str | None = _opt(
        None, "Jinja chat template text, or a path to a .jinja file; null = the tokenizer's template"
    )
    skip_invalid: bool = _opt(False, "skip malformed records (counted and reported) instead of failing")
    truncation: bool = _opt(False, "truncate examples longer than seq_len instead of failing")
    num_proc: int | None = _opt(None, "worker processes for tokenization; null = one")
    cache_dir: str | None = _opt(None, "folder for downloaded and tokenized data; null = HF default")
    shuffle: bool = _opt(True, "shuffle training examples (with seed)")

    def _check(self, where: str) -> None:
        if not self.train:
            raise UserError(f"{where}.train must list at least one dataset (path and format)")
        self._in_unit(where, "validation_split")
        self._ge(where, "seq_len", 2)
        self._ge(where, "num_proc", 1)
        self._non_empty(where, "cache_dir")


@_section
class TrainSection(_Section):
    """Optimization: steps, batch, AdamW, schedule, memory."""

    _prefix = "train"

    batch_size: int = _opt(8, "sequences per optimizer micro-step, across all devices")
    grad_accum_steps: int = _opt(1, "micro-steps accumulated per optimizer update")
    max_steps: int | None = _opt(
        200, "optimizer updates; null if num_epochs is given without it; with both, the first limit ends"
    )
    num_epochs: float | None = _opt(None, "passes over data.train; null = limited by max_steps only")
    learning_rate: float = _opt(2.0e-4, "peak learning rate")
    lr_schedule: LrSchedule = _opt("cosine", "decay after warmup, down to min_lr_ratio * learning_rate")
    warmup_steps: int = _opt(10, "linear warmup steps (ignored when warmup_ratio is set)")
    warmup_ratio: float | None = _opt(None, "warmup as a fraction of total steps, in [0, 1)")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of learning_rate, in [0, 1]")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay on LoRA parameters")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = _opt(1.0, "clip gradients to this global norm; null = no clipping")
    remat: Remat = _opt("none", "recompute activations: none, dots (save matmul outputs) or full")
    loss_chunk_size: int = _opt(1024, "tokens per cross-entropy chunk (bounds the logits memory)")
    eval_every_steps: int | None = _opt(50, "evaluate every N optimizer steps; null = never")
    eval_batches: int | None = _opt(None, "batches per evaluation; null = all validation data")

    def _check(self, where: str) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_steps", "loss_chunk_size"):
            self._ge(where, name, 1)
        for name in ("eval_every_steps", "eval_batches"):
            self._ge(where, name, 1)
        if self.max_steps is None and self.num_epochs is None:
            raise UserError(
                f"{where}.max_steps and {where}.num_epochs are both null; "
                f"set one (e.g. {where}.max_steps=1000)"
            )
        self._gt(where, "num_epochs", 0)
        self._gt(where, "learning_rate", 0)
        self._ge(where, "warmup_steps", 0)
        self._in_unit(where, "warmup_ratio")
        self._in_unit(where, "min_lr_ratio", closed=True)
        self._ge(where, "weight_decay", 0)
        self._in_unit(where, "adam_beta1")
        self._in_unit(where, "adam_beta2")
        self._gt(where, "adam_eps", 0)
        self._gt(where, "max_grad_norm", 0)


@_section
class CheckpointSection(_Section):
    """Saving and resuming training state."""

    _prefix = "checkpoint"

    every_steps: int | None = _opt(
        100, "save every N optimizer steps (and at the end); null = only at the end"
    )
    keep: int = _opt(2, "most recent checkpoints kept")
    resume: Resume = _opt(
        "auto", "auto = resume from output_dir if it has a checkpoint; always = fail if none; never"
    )

    def _check(self, where: str) -> None:
        self._ge(where, "every_steps", 1)
        self._ge(where, "keep", 1)


@_section
class LoggingSection(_Section):
    """Metrics output."""

    _prefix = "logging"

    every_steps: int = _opt(10, "log training metrics every N optimizer steps")
    tensorboard: bool = _opt(True, "write TensorBoard event files to output_dir")
    progress_bar: bool = _opt(True, "show a progress bar on the terminal")

    def _check(self, where: str) -> None:
        self._ge(where, "every_steps", 1)


@_section
class MeshSection(_Section):
    """Device mesh axis sizes for parallel.strategy mesh."""

    _prefix = "parallel.mesh"

    data: int = _opt(-1, "data-parallel axis size; -1 = all devices left over")
    fsdp: int = _opt(1, "axis that shards parameters and optimizer state")
    tensor: int = _opt(1, "tensor-parallel axis size")

    def _check(self, where: str) -> None:
        if self.data != -1 and self.data < 1:
            raise UserError(f"{where}.data must be -1 (all remaining devices) or >= 1, got {self.data}")
        self._ge(where, "fsdp", 1)
        self._ge(where, "tensor", 1)


@_section
class DistributedSection(_Section):
    """Multi-host setup (jax.distributed.initialize)."""

    _prefix = "parallel.distributed"

    enabled: bool | None = _opt(None, "initialize multi-host JAX; null = auto-detect from the environment")
    coordinator_address: str | None = _opt(None, "host:port of process 0; null = auto-detect")
    num_processes: int | None = _opt(None, "number of processes; null = auto-detect")
    process_id: int | None = _opt(None, "this process's index; null = auto-detect")

    def _check(self, where: str) -> None:
        self._ge(where, "num_processes", 1)
        self._ge(where, "process_id", 0)
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            raise UserError(
                f"{where}.process_id must be < num_processes ({self.num_processes}), got {self.process_id}"
            )
        if self.enabled is False and self.coordinator_address is not None:
            raise UserError(f"{where}.coordinator_address is set but {where}.enabled is false")


@_section
class ParallelSection(_Section):
    """How devices are used."""

    _prefix = "parallel"

    strategy: Strategy = _opt(
        "auto", "auto (single device or data-parallel mesh), single, pmap, or mesh (uses parallel.mesh)"
    )
    mesh: MeshSection = _sub(MeshSection, "mesh axis sizes")
    distributed: DistributedSection = _sub(DistributedSection, "multi-host setup")

    def _check(self, where: str) -> None:
        if self.strategy in ("single", "pmap"):
            for name in ("fsdp", "tensor"):
                if getattr(self.mesh, name) != 1:
                    raise UserError(
                        f"{where}.mesh.{name}={getattr(self.mesh, name)} needs "
                        f"{where}.strategy mesh or auto, not {self.strategy}"
                    )


@_section
class Config(_Section):
    """A whole run. Build with `load_config` or `config_from_dict`; save with `save_config`."""

    output_dir: str = _req("run folder: checkpoints, adapters, logs and the resolved config.yaml")
    seed: int = _opt(0, "seed for parameter init, dropout, shuffling and the validation split")
    overwrite: bool = _opt(False, "allow writing into a non-empty output_dir that is not being resumed")
    model: ModelSection = _req("base model")
    quant: QuantSection = _sub(QuantSection, "base weight quantization")
    lora: LoraSection = _sub(LoraSection, "adapters")
    data: DataConfig = _req("datasets")
    train: TrainSection = _sub(TrainSection, "optimization")
    checkpoint: CheckpointSection = _sub(CheckpointSection, "checkpoints")
    logging: LoggingSection = _sub(LoggingSection, "metrics")
    parallel: ParallelSection = _sub(ParallelSection, "devices")

    def _check(self, where: str) -> None:
        self._non_empty(where, "output_dir")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
        if (
            self.train.eval_every_steps is not None
            and not self.data.validation
            and not self.data.validation_split
        ):
            raise UserError(
                "train.eval_every_steps is set but there is no validation data (data.validation is empty and "
                "data.validation_split is 0); set train.eval_every_steps=null or give validation data"
            )


# ----------------------------------------------------------------------------------------------------
# Type coercion


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """How a type is written in errors and docs: `int | null`, `xla | cudnn`, `list[str]`."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " | ".join("null" if a is _NONE else _type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return tp.__name__


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = "mapping" if isinstance(value, Mapping) else type(value).__name__
    return f"{text} ({kind})"


def _type_error(key: str, value: Any, tp: Any) -> UserError:
    return UserError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _number(text: str) -> float | None:
    """A float from a string such as '1e-4' (PyYAML reads exponents without a dot as strings)."""
    try:
        return float(text.strip())
    except ValueError:
        return None


def _fits(value: Any, tp: Any) -> bool:
    """Whether `value` already has the shape of type `tp` (no coercion)."""
    origin = get_origin(tp)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, Mapping)
    return isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp` and return it in canonical form (tuples, FrozenDict, floats)."""
    if _is_union(tp):
        args = get_args(tp)
        if value is None and _NONE in args:
            return None
        arms = [a for a in args if a is not _NONE]
        if len(arms) == 1:
            return _convert(value, arms[0], key)
        for arm in arms:  # the arm of the value's shape: a string stays a string, a list becomes a tuple
            if _fits(value, arm):
                return _convert(value, arm, key)
        for arm in arms:  # else the first arm that accepts it after coercion
            try:
                return _convert(value, arm, key)
            except UserError:
                pass
        raise _type_error(key, value, tp)

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, {} if value is None else value, key)  # an empty YAML section means defaults
    if value is None:
        takes_none = get_origin(tp) is Literal and "none" in get_args(tp)
        hint = " (write none, a string, not null)" if takes_none else ""
        raise UserError(f"{key} must not be null; expected {_type_name(tp)}{hint}")

    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        close = difflib.get_close_matches(str(value).lower(), args, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{key} must be one of {', '.join(args)}; got {_show(value)}{hint}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, Mapping) and not dataclasses.is_dataclass(args[0]):
            raise _type_error(key, value, tp)
        else:
            items = [value]  # a single item may be written without brackets
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, tp)
        return FrozenDict(
            (_convert(k, args[0], f"{key} (a key)"), _convert(v, args[1], f"{key}.{k}"))
            for k, v in value.items()
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                value_f = _number(value)
                if value_f is not None and value_f.is_integer():
                    return int(value_f)
        elif isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key} must be a finite number, got {_show(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # e.g. a numeric revision or split
            return str(value)
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise _type_error(key, value, tp)


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and FrozenDicts to plain dicts and lists."""
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------
# Building from mappings, unknown keys


# Names from HF Trainer, PEFT and Axolotl configs, mapped to ours (used for suggestions only).
_ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target_linear": "lora.target_modules",
    "lr": "train.learning_rate",
    "micro_batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "lr_scheduler": "train.lr_schedule",
    "lr_scheduler_type": "train.lr_schedule",
    "gradient_checkpointing": "train.remat",
    "eval_steps": "train.eval_every_steps",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep",
    "resume_from_checkpoint": "checkpoint.resume",
    "logging_steps": "logging.every_steps",
    "sequence_len": "data.seq_len",
    "max_seq_length": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "seq_length": "data.seq_len",
    "max_length": "data.seq_len",
    "sample_packing": "data.packing",
    "datasets": "data.train",
    "dataset": "data.train",
    "test_datasets": "data.validation",
    "val_set_size": "data.validation_split",
    "dataset_prepared_path": "data.cache_dir",
    "dataset_processes": "data.num_proc",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "torch_dtype": "model.dtype",
    "bf16": "model.dtype",
    "load_in_8bit": "quant.weights",
    "load_in_4bit": "quant.weights",
    "output": "output_dir",
}
_SOURCE_ALIASES = {"type": "format", "name": "subset", "data_files": "path", "columns": "fields"}


@functools.cache
def _all_keys(cls: type = Config, where: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema (sections and leaves), not descending into list items."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        key = _join(where, f.name)
        keys.append(key)
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key))
    return tuple(keys)


def _suggest(where: str, name: str, cls: type) -> str | None:
    """The most likely intended key for an unknown `name` in section `cls` at `where`."""
    siblings = [f.name for f in dataclasses.fields(cls)]
    lowered = name.lower()
    if cls is DataSource and lowered in _SOURCE_ALIASES:
        return _join(where, _SOURCE_ALIASES[lowered])
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    close = difflib.get_close_matches(lowered, siblings, n=1, cutoff=0.6)
    if close:
        return _join(where, close[0])
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(_all_keys())}  # first key per leaf name
    if lowered in leaves:
        return leaves[lowered]  # right name, wrong section
    close = difflib.get_close_matches(lowered, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def _unknown_key(where: str, name: Any, cls: type) -> str:
    key = _join(where, str(name))
    hint = _suggest(where, str(name), cls)
    if hint:
        return f"unknown key '{key}'; did you mean '{hint}'?"
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"unknown key '{key}'; valid keys{f' in {where!r}' if where else ''}: {names}"


def _build(cls: type, raw: Any, where: str) -> Any:
    """Construct section `cls` at dotted path `where` from a mapping, rejecting unknown or missing keys."""
    if not isinstance(raw, Mapping):
        what = f"'{where}'" if where else "the config"
        raise UserError(f"{what}: expected a mapping of keys, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            raise UserError(_unknown_key(where, name, cls))
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = raw[name]
        elif _is_required(f):
            if dataclasses.is_dataclass(_hints(cls)[name]):
                kwargs[name] = None  # build it empty so the error names the missing leaf, e.g. model.path
            else:
                raise UserError(f"missing required key '{_join(where, name)}' ({f.metadata['help']})")
    token = _WHERE.set(where)
    try:
        return cls(**kwargs)
    finally:
        _WHERE.reset(token)


# ----------------------------------------------------------------------------------------------------
# Overrides: key=value with dotted keys, [i] list indices and YAML values

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def _parse_override(text: str) -> tuple[list[str | int], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {text!r} must look like key=value, e.g. train.max_steps=3")
    segments: list[str | int] = []
    for part in key.split("."):
        match = _SEGMENT.fullmatch(part)
        if not match:
            raise UserError(f"override {text!r}: bad key {key!r}; use dotted names like data.train[0].path")
        segments.append(match.group(1))
        segments.extend(int(i) for i in re.findall(r"\d+", match.group(2)))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UserError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    return segments, value


def _check_override_key(segments: list[str | int], text: str) -> None:
    """Walk the schema so a misspelt override is reported as such, with a suggestion."""
    tp: Any = Config
    where = ""
    for seg in segments:
        arms = [a for a in get_args(tp) if a is not _NONE] if _is_union(tp) else [tp]
        if isinstance(seg, int):
            lists = [a for a in arms if get_origin(a) is tuple]
            if not lists:
                raise UserError(f"override {text!r}: '{where}' is not a list")
            tp, where = get_args(lists[0])[0], f"{where}[{seg}]"
            continue
        sections = [a for a in arms if dataclasses.is_dataclass(a)]
        if not sections:
            raise UserError(f"override {text!r}: '{where}' is a value, not a section with keys")
        if seg not in {f.name for f in dataclasses.fields(sections[0])}:
            raise UserError(f"override {text!r}: {_unknown_key(where, seg, sections[0])}")
        tp, where = _hints(sections[0])[seg], _join(where, seg)


def _merge(old: Any, new: Any) -> Any:
    """`new` replaces `old`, except that mappings are merged key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k, v in new.items():
            old[k] = _merge(old.get(k), v)
        return old
    return new


def _apply_override(raw: dict, text: str) -> None:
    segments, value = _parse_override(text)
    _check_override_key(segments, text)
    node: Any = raw
    path = ""
    for seg, nxt in zip(segments, segments[1:], strict=False):
        if isinstance(seg, int):
            if seg >= len(node):
                raise UserError(f"override {text!r}: '{path}' has {len(node)} item(s), no index {seg}")
            child, path = node[seg], f"{path}[{seg}]"
        else:
            child, path = node.get(seg), _join(path, seg)
        if isinstance(nxt, int):
            child = [child] if isinstance(child, dict) else list(child or [])  # a lone mapping is one item
        elif not isinstance(child, dict):
            child = {}
        node[seg] = child
        node = child
    last = segments[-1]
    if isinstance(last, int):
        if last > len(node):
            raise UserError(
                f"override {text!r}: '{path}' has {len(node)} item(s); use index {len(node)} to add one"
            )
        if last == len(node):
            node.append(value)
            return
        node[last] = _merge(node[last], value)
    else:
        node[last] = _merge(node.get(last), value)


# ----------------------------------------------------------------------------------------------------
# Public API


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last."""


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UserError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def config_from_dict(d: Mapping[str, Any], overrides: Iterable[str] = ()) -> Config:
    """Build and validate a `Config` from nested mappings (as read from YAML), after `key=value` overrides.

    Unknown keys, wrong types, missing required keys and invalid values raise `UserError`. When
    `train.num_epochs` is given and `train.max_steps` is not, `max_steps` becomes null (train by epochs).
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    if not isinstance(d, Mapping):
        raise UserError(f"the config must be a mapping of keys, got {_show(d)}")
    raw = copy.deepcopy(dict(d))
    for text in overrides:
        _apply_override(raw, text)
    train = raw.get("train")
    if isinstance(train, dict) and train.get("num_epochs") is not None and "max_steps" not in train:
        train["max_steps"] = None
    return _build(Config, raw, "")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file, apply `key=value` overrides (values parsed as YAML) and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path}: {err}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML at {_yaml_problem(err)}") from None
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {_show(raw)}")
    return config_from_dict(raw, overrides)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A copy of `cfg` with `key=value` overrides applied and validated."""
    return config_from_dict(cfg.to_dict(), overrides)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); `load_config(path)` gives back an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# jaxlora resolved config\n" + cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Reference tables for docs/configuration.md


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, float) and value and abs(value) < 1e-3:  # 2.0e-4, not 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def reference_tables() -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """(title, rows) per section; a row is (dotted key, type, default or 'required', meaning)."""
    tables: list[tuple[str, list[tuple[str, str, str, str]]]] = []

    def walk(cls: type, where: str, title: str) -> None:
        rows: list[tuple[str, str, str, str]] = []
        nested: list[tuple[type, str]] = []
        tables.append((title, rows))
        for f in dataclasses.fields(cls):
            tp, key = _hints(cls)[f.name], _join(where, f.name)
            if dataclasses.is_dataclass(tp):
                nested.append((tp, key))
                continue
            default = "required" if _is_required(f) else f"`{_default_text(f.default)}`"
            rows.append((key, _type_name(tp), default, f.metadata["help"]))
            if get_origin(tp) is tuple and get_args(tp)[0] is DataSource and f.name == "train":
                nested.append((DataSource, f"{key}[i]"))
        for sub, key in nested:
            walk(sub, key, f"{key} and data.validation[i] (DataSource)" if sub is DataSource else key)

    walk(Config, "", "top level")
    return tables


def reference_markdown() -> str:
    """The key tables of docs/configuration.md, rendered from the dataclasses."""
    out = []
    for title, rows in reference_tables():
        out += [f"### `{title}`" if title != "top level" else "### Top level", ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in rows:
            key, tp, default, meaning = (cell.replace("|", "\\|") for cell in row)
            out.append(f"| `{key}` | {tp} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
