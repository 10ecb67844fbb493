"""YAML in and out, and `key=value` overrides with dotted keys, `[i]` list indices and YAML values."""

import copy
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxlora.config.sections import Config
from jaxlora.errors import UserError
from jaxlora.schema import item_type, join, section_type, show, unknown_key

__all__ = ["apply_overrides", "config_from_dict", "load_config", "save_config"]


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


# ----------------------------------------------------------------------------------------------------
# Overrides

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
        if isinstance(seg, int):
            if item_type(tp) is None:
                raise UserError(f"override {text!r}: '{where}' is not a list")
            tp, where = item_type(tp), f"{where}[{seg}]"
            continue
        section = section_type(tp)
        if section is None:
            raise UserError(f"override {text!r}: '{where}' is a value, not a section with keys")
        if seg not in section.model_fields:
            raise UserError(f"override {text!r}: {unknown_key(Config, where, seg, section)}")
        tp, where = section.model_fields[seg].annotation, join(where, seg)


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
            child, path = node.get(seg), join(path, seg)
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


def config_from_dict(d: Mapping[str, Any], overrides: Iterable[str] = ()) -> Config:
    """Build and validate a `Config` from nested mappings (as read from YAML), after `key=value` overrides.

    Unknown keys, wrong types, missing required keys and invalid values raise `UserError`. When
    `train.num_epochs` is given and `train.max_steps` is not, `max_steps` becomes null (train by epochs).
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    if not isinstance(d, Mapping):
        raise UserError(f"the config must be a mapping of keys, got {show(d)}")
    raw = copy.deepcopy(dict(d))
    for text in overrides:
        _apply_override(raw, text)
    train = raw.get("train")
    if isinstance(train, dict) and train.get("num_epochs") is not None and "max_steps" not in train:
        train["max_steps"] = None
    return Config.from_dict(raw)


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
        raise UserError(f"{path}: the top level must be a mapping of keys, got {show(raw)}")
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
