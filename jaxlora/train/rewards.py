"""Reward functions for GRPO: found from their names in `grpo.reward_funcs`, and called as TRL's
`GRPOTrainer` calls them.

Names (a `RewardFunc` of the config: the name, and keyword arguments bound to the function):

    path/to/file.py:function    a Python file, relative to `base_dir` (the working directory by default)
    package.module:function     an importable module
    jaxlora:<built-in>          `jaxlora.train.reward_funcs`: exact_answer, format_reward, length_penalty

The contract (TRL's): a reward function takes keyword arguments `prompts`, `completions` (text, or a
list of messages for a conversational prompt), `completion_ids` (lists of token ids) and every other
column of the dataset rows by name (`answer`, `solution`, ...), one entry per completion, and returns one
float per completion. `None` means "not applicable": it is left out of that function's statistics and
of the weighted sum (a completion no function scores gets advantage 0). A function without `**kwargs`
receives only the arguments it names.

A function that raises, returns the wrong number of rewards or something that is not a number stops the
run with a `RewardError` (a `UserError`: one line naming the function and the row; to find the row, a
function that raised is called again one row at a time), which the training loop catches to save a
checkpoint before it stops.
"""

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxlora.errors import UserError
from jaxlora.train.reward_funcs import BUILTINS

__all__ = ["LoadedReward", "RewardError", "load_reward", "load_rewards", "score"]

BUILTIN_PREFIX = "jaxlora"
NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # as TRL: the row's other columns are passed


class RewardError(UserError):
    """A reward function failed while the run scored completions (raised, wrong length, not a number)."""


@dataclasses.dataclass(frozen=True)
class LoadedReward:
    """A reward function ready to call: `name` is its metric name (`rewards/<name>/mean`), `spec` the
    config's name for it, `fn` the callable with its arguments bound."""

    name: str
    spec: str
    fn: Callable


def _function_name(fn: Callable) -> str:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(inner, "__name__", type(inner).__name__)


def _bind(fn: Callable, spec: str, args: Mapping) -> Callable:
    """`fn` with `args` bound; an argument the function does not take is one line."""
    if not args:
        return fn
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [a for a in args if a not in params]
        if unknown:
            raise UserError(
                f"reward function {spec!r} takes no argument {unknown[0]!r} (its arguments: "
                f"{', '.join(params) or 'none'}); fix grpo.reward_funcs args"
            )
    return functools.partial(fn, **args)


def _builtin(spec: str, name: str, args: Mapping) -> Callable:
    if name not in BUILTINS:
        raise UserError(
            f"unknown built-in reward function {spec!r}; the built-ins are "
            f"{', '.join(f'{BUILTIN_PREFIX}:{n}' for n in BUILTINS)}"
        )
    try:
        return BUILTINS[name](**args)
    except (TypeError, ValueError, re.error) as err:  # bad args, or a pattern that does not compile
        raise UserError(f"reward function {spec!r}: {_first_line(err)}; fix grpo.reward_funcs args") from None


def _module_from_file(path: Path, spec: str):
    if not path.is_file():
        raise UserError(f"reward function {spec!r}: file {str(path)!r} not found; check the path")
    name = f"jaxlora_reward_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except Exception as err:  # the file's own error, in one line
        raise UserError(f"reward function {spec!r}: {path} failed to import: {_describe(err)}") from None
    sys.modules[name] = module
    return module


def _module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and name.startswith(err.name):  # the module itself (or its package) is missing
            raise UserError(
                f"reward function {spec!r}: no module named {name!r}; install it or check the name"
            ) from None
        raise UserError(f"reward function {spec!r}: importing {name} failed: {_describe(err)}") from None
    except Exception as err:
        raise UserError(f"reward function {spec!r}: importing {name} failed: {_describe(err)}") from None


def load_reward(spec: str, args: Mapping | None = None, base_dir: str | Path | None = None) -> LoadedReward:
    """The reward function named `spec` (see the module docstring) with `args` bound; `UserError` (one
    line) for a missing file, module or function."""
    args = dict(args or {})
    where, _, function = spec.rpartition(":")
    if not where or not function:
        raise UserError(
            f"reward function {spec!r} names no function; write path/to/file.py:function, "
            "package.module:function or jaxlora:exact_answer"
        )
    if where == BUILTIN_PREFIX:
        fn = _builtin(spec, function, args)
        return LoadedReward(_function_name(fn), spec, fn)
    if where.endswith(".py"):
        module = _module_from_file(Path(base_dir or ".") / where, spec)
    else:
        module = _module(where, spec)
    fn = getattr(module, function, None)
    if fn is None:
        names = ", ".join(sorted(n for n, v in vars(module).items() if callable(v) and n[0] != "_"))
        raise UserError(
            f"reward function {spec!r}: {where} has no {function!r} (it defines: {names or 'none'})"
        )
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: {function!r} in {where} is not callable")
    fn = _bind(fn, spec, args)
    return LoadedReward(_function_name(fn), spec, fn)


def load_rewards(entries, base_dir: str | Path | None = None) -> list[LoadedReward]:
    """Every function of `grpo.reward_funcs` (`RewardFunc`s, names, or {"name", "args"} mappings); a
    name used twice gets a suffix (`exact_answer_2`) so each has its own metrics."""
    loaded, seen = [], {}
    for entry in entries:
        if isinstance(entry, str):
            spec, args = entry, {}
        elif isinstance(entry, Mapping):
            spec, args = entry["name"], entry.get("args", {})
        else:
            spec, args = entry.name, entry.args
        r = load_reward(spec, args, base_dir)
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r = dataclasses.replace(r, name=f"{r.name}_{seen[r.name]}")
        loaded.append(r)
    return loaded


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def _describe(err: BaseException) -> str:
    line = _first_line(err)
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _accepts(fn: Callable) -> set[str] | None:
    """The keyword arguments `fn` takes, or None when it takes any (**kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _row(kwargs: dict, i: int) -> dict:
    return {k: (v[i : i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}


def _failing_row(fn: Callable, kwargs: dict, n: int) -> tuple[int, BaseException] | None:
    """The first row whose call alone raises too (with its error), or None."""
    for i in range(n):
        try:
            fn(**_row(kwargs, i))
        except Exception as err:
            return i, err
    return None


def _call(r: LoadedReward, kwargs: dict, n: int, rows: Sequence, prompts) -> list:
    """One function's rewards for the n completions (a list of floats or None)."""
    accepts = _accepts(r.fn)
    if accepts is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in accepts}
    head = f"reward function {r.name!r} ({r.spec})"
    try:
        out = r.fn(**kwargs)
    except Exception as err:
        found = _failing_row(r.fn, kwargs, n)
        if found is None:
            raise RewardError(f"{head} raised {_describe(err)} on a batch of {n} completions") from err
        i, err = found
        raise RewardError(
            f"{head} raised {_describe(err)} on row {rows[i]} (prompt {_snippet(prompts[i])}); "
            "fix the function or that row"
        ) from err
    if hasattr(out, "tolist") and not isinstance(out, list):  # a numpy array or torch tensor
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str) or len(out) != n:
        got = f"{len(out)} rewards" if isinstance(out, Sequence) else type(out).__name__
        raise RewardError(
            f"{head} returned {got} for {n} completions; return one float or None per completion"
        )
    return list(out)


def _snippet(prompt) -> str:
    text = prompt if isinstance(prompt, str) else str(prompt)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _as_float(value, head: str, row) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool | int | float | np.number):
        return float(value)
    raise RewardError(
        f"{head} returned {value!r} ({type(value).__name__}) for row {row}; return a float or None"
    )


def score(
    funcs: Sequence[LoadedReward],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: Mapping[str, list] | None = None,
    rows: Sequence | None = None,
    extra: Mapping | None = None,
) -> np.ndarray:
    """Each function's rewards [N, F] float32 (NaN where it returned None) for N completions.

    `prompts`, `completions`, `completion_ids` and each of `columns` (the dataset's other columns,
    repeated per completion as TRL does) hold one entry per completion; `rows` names the rows in errors
    (default 0..N-1); `extra` are more keyword arguments for every function (e.g. TRL's `trainer_state`).
    """
    n = len(completions)
    rows = list(range(n)) if rows is None else list(rows)
    kwargs = {k: list(v) for k, v in (columns or {}).items() if k not in NOT_COLUMNS}
    kwargs.update(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids))
    kwargs.update(extra or {})
    out = np.full((n, len(funcs)), np.nan, np.float32)
    for j, r in enumerate(funcs):
        values = _call(r, kwargs, n, rows, prompts)
        head = f"reward function {r.name!r} ({r.spec})"
        out[:, j] = [_as_float(v, head, rows[i]) for i, v in enumerate(values)]
    return out
