"""Frozen pydantic sections whose validation errors are one `UserError` line naming the dotted key.

    class LoraConfig(Section):
        _prefix = "lora"                      # the key path used when the section is built in code
        r: Int = Field(8, ge=1, description="rank of each adapter")

    LoraConfig(r=0)             # UserError: lora.r must be >= 1, got 0
    Config.from_dict(raw)       # every nested error named from the top, e.g. data.train[0].format

pydantic checks the types and bounds declared on the fields. This module adds the few things it does not
do our way: the value types below (YAML 1.1 reads `1e-4` as text; booleans must be booleans; a list key
takes a single value), and `one_line`, which turns a `ValidationError` (a multi-line report of every
problem) into the one message a person acts on. It sits below every layer that owns a section
(`lora`, `data`, `config`), so each can declare its own.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
    model_validator,
)

from jaxlora.errors import UserError

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Invalid",
    "NonBlank",
    "Section",
    "Str",
    "item_type",
    "join",
    "listing",
    "one_line",
    "section_type",
    "show",
    "type_name",
    "unknown_key",
]


class Invalid(ValueError):
    """Raised by a validator. In `text`, `{key}` is the dotted key checked (`at` below the validated
    section, if given) and `{name}` is the key of a sibling `name`; keyword `values` fill any other field,
    so user text is never read as a placeholder."""

    def __init__(self, text: str, at: str = "", **values: Any) -> None:
        super().__init__(text)
        self.text, self.at, self.values = text, at, values

    def render(self, where: str) -> str:
        keys = _Keys({"key": join(where, self.at), **self.values}, where)
        return self.text.format_map(keys)


class _Keys(dict):
    def __init__(self, values: dict, where: str) -> None:
        super().__init__(values)
        self.where = where

    def __missing__(self, name: str) -> str:
        return join(self.where, name)


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where and name else where or name


def show(value: Any) -> str:
    """A value as errors print it: its repr (cut at 60 characters) and its YAML kind."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = "mapping" if isinstance(value, Mapping) else type(value).__name__
    return f"{text} ({kind})"


# ----------------------------------------------------------------------------------------------------
# Value types


def _as_int(value: Any) -> Any:
    """1000.0, '1e3' and ' 3' as int (PyYAML reads exponents without a dot as text)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = _as_float(value)
            return int(number) if isinstance(number, float) and number.is_integer() else value
    return value


def _as_float(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _as_str(value: Any) -> Any:
    """An integer as text, e.g. a numeric revision or split."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise Invalid("{key} must not be empty")
    return value


# Strict underneath, so booleans are never numbers and numbers never booleans.
Int = Annotated[int, Strict(), BeforeValidator(_as_int)]
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_as_float)]
Str = Annotated[str, Strict(), BeforeValidator(_as_str)]
NonBlank = Annotated[Str, AfterValidator(_non_blank)]
Bool = Annotated[bool, Strict()]


def listing(item: Any) -> Any:
    """`tuple[item, ...]` that also takes a single item written without brackets."""

    def one_or_many(value: Any) -> Any:
        if value is None or isinstance(value, list | tuple):
            return value
        if isinstance(value, Mapping | Section) and section_type(item) is None:
            return value  # a mapping is not one string: a type error
        return [value]

    return Annotated[tuple[item, ...], BeforeValidator(one_or_many)]


# ----------------------------------------------------------------------------------------------------
# The section base


class _Built(type(BaseModel)):
    """Turns the `ValidationError` of a section built in code, `LoraConfig(r=0)`, into one `UserError`.

    Done at the class call, not in `__init__`: pydantic calls a custom `__init__` for every nested section
    too, and only the outermost call knows the full key path.
    """

    def __call__(cls, *args: Any, **data: Any) -> Any:
        try:
            return super().__call__(*args, **data)
        except ValidationError as err:
            raise UserError(one_line(err, cls, cls._prefix)) from None


class Section(BaseModel, metaclass=_Built):
    """A frozen, keyword-only group of config keys; unknown keys and bad values raise `UserError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    _prefix: ClassVar[str] = ""  # dotted path named in errors when the section is built in code
    _aliases: ClassVar[dict[str, str]] = {}  # other projects' names for keys here, for suggestions

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Self:
        """Validate nested mappings (as read from YAML); errors name keys under `where`."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise UserError(one_line(err, cls, cls._prefix if where is None else where)) from None

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # `lora:` with nothing under it

    @classmethod
    def suggest(cls, where: str, name: str, section: type[Section]) -> str | None:
        """The key most likely meant by unknown `name` in `section` at `where`: the section's own aliases,
        then a close spelling. The root section of a validation chooses (`Config` knows every key)."""
        if name.lower() in section._aliases:
            return join(where, section._aliases[name.lower()])
        close = difflib.get_close_matches(name.lower(), list(section.model_fields), n=1, cutoff=0.6)
        return join(where, close[0]) if close else None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML-safe); `from_dict` of it gives an equal object."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The section as YAML text, keys in declaration order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------
# Reading the declared types


def _bare(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _arms(tp: Any) -> list[Any]:
    """The types a value of `tp` may have, without None."""
    tp = _bare(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return [_bare(a) for a in get_args(tp) if a is not type(None)]
    return [tp]


def section_type(tp: Any) -> type[Section] | None:
    """The section class `tp` holds, if any."""
    return next((a for a in _arms(tp) if isinstance(a, type) and issubclass(a, Section)), None)


def item_type(tp: Any) -> Any:
    """The item type of the list `tp` holds, if any."""
    return next((get_args(a)[0] for a in _arms(tp) if get_origin(a) is tuple), None)


def _value_type(tp: Any) -> Any:
    return next((get_args(a)[1] for a in _arms(tp) if get_origin(a) is dict), None)


def type_name(tp: Any, null: bool = True) -> str:
    """How a type reads in errors and docs: `int | null`, `xla | cudnn`, `list[str]`."""
    tp = _bare(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if null and type(None) in args else []))
    if origin is Literal:
        return " | ".join(args)
    if origin is tuple:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]"
    return tp.__name__


# ----------------------------------------------------------------------------------------------------
# ValidationError -> one line


def _locate(root: type[Section], loc: tuple, where: str) -> tuple[str, Any, Any]:
    """(dotted key, field info or None, declared type) of an error location such as ('data', 'train', 0)."""
    key, tp, info = where, root, None
    for part in loc:
        section = section_type(tp)
        if isinstance(part, str) and section is not None and part in section.model_fields:
            info = section.model_fields[part]
            key, tp = join(key, part), info.annotation
        elif isinstance(part, int) and item_type(tp) is not None:
            key, tp, info = f"{key}[{part}]", item_type(tp), None
        elif isinstance(part, str) and len(_arms(tp)) == 1 and _value_type(tp) is not None:
            key, tp, info = f"{key}.{part}", _value_type(tp), None
        # else the tag pydantic gives a union's arm: the key stays
    return key, info, tp


def unknown_key(root: type[Section], where: str, name: str, section: type[Section]) -> str:
    key = join(where, name)
    hint = root.suggest(where, name, section)
    if hint:
        return f"unknown key '{key}'; did you mean '{hint}'?"
    names = ", ".join(section.model_fields)
    return f"unknown key '{key}'; valid keys{f' in {where!r}' if where else ''}: {names}"


def _number(value: Any) -> str:
    if isinstance(value, int) and value >= 2**16 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(value)


def _range(info: Any, ctx: dict) -> str:
    """'must be in [0, 1)' or 'must be >= 1' from the bounds declared on the field (else pydantic's one)."""
    bounds = {}
    for meta in info.metadata if info else ():
        bounds.update(
            {k: getattr(meta, k) for k in ("ge", "gt", "le", "lt") if getattr(meta, k, None) is not None}
        )
    bounds = bounds or ctx
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"must be in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    return f"must be {'<=' if high[0] == ']' else '<'} {_number(high[1])}"


def one_line(err: ValidationError, root: type[Section], where: str = "") -> str:
    """The first problem of `err` (unknown keys first, as a reader fixes them first) as one line."""
    errors = err.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    kind, loc, value, ctx = first["type"], first["loc"], first["input"], first.get("ctx") or {}
    if kind == "extra_forbidden":
        parent, _, tp = _locate(root, loc[:-1], where)
        return unknown_key(root, parent, str(loc[-1]), section_type(tp))
    key, info, tp = _locate(root, loc, where)
    if kind == "missing":
        while (section := section_type(tp)) is not None:  # name the missing leaf: model -> model.path
            name, info = next((n, f) for n, f in section.model_fields.items() if f.is_required())
            key, tp = join(key, name), info.annotation
        return f"missing required key '{key}' ({info.description})"
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        return error.render(key) if isinstance(error, Invalid) else f"{key}: {error or first['msg']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        value = _as_float(value) if float in _arms(tp) else value  # the value as the field holds it
        return f"{key} {_range(info, ctx)}, got {value}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {show(value)}"
    if kind == "model_type":
        where_text = f"'{key}':" if key else "the config:"
        return f"{where_text} expected a mapping of keys, got {show(value)}"
    literal = next((get_args(a) for a in _arms(tp) if get_origin(a) is Literal), None)
    if value is None:
        hint = " (write none, a string, not null)" if literal and "none" in literal else ""
        return f"{key} must not be null; expected {type_name(tp, null=False)}{hint}"
    if kind == "literal_error" and literal:
        close = difflib.get_close_matches(str(value).lower(), literal, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key} must be one of {', '.join(literal)}; got {show(value)}{hint}"
    return f"{key}: expected {type_name(tp, null=False)}, got {show(value)}"
