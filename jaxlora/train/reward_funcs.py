"""The built-in reward functions, named in the config as `jaxlora:<name>` (`jaxlora.train.rewards`):

    jaxlora:exact_answer     1.0 when the answer extracted from the completion equals the row's answer
                             (args: extract = last_number | boxed | regex, pattern, column = answer);
                             None (not applicable) for a row without an answer
    jaxlora:format_reward    1.0 when the completion matches `pattern` (re.match, DOTALL and MULTILINE, as
                             TRL's `think_format_reward`), else 0.0
    jaxlora:length_penalty   DAPO's soft overlong punishment over the completion's tokens, as TRL's
                             `get_soft_overlong_punishment(max_length, cache)`: 0 up to max_length - cache,
                             then falling linearly to -1 at max_length, -1 beyond

Each is a class: its arguments (the config's `args`) are checked when it is built, and an instance is
called as TRL calls a reward function (`completions`, `completion_ids`, the dataset columns, ...).
"""

import math
import re

__all__ = ["BUILTINS", "ExactAnswer", "FormatReward", "LengthPenalty", "completion_text"]

EXTRACTIONS = ("last_number", "boxed", "regex")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return completion_text(completion[-1]) if completion else ""


def last_number(text: str) -> str | None:
    """The last number written in `text`, without thousands separators ("1,234.5" -> "1234.5")."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _same(got: str, want: str) -> bool:
    """Equal as numbers when both are numbers (72 == 72.0 == 72.00), else as whitespace-collapsed text."""
    got, want = (" ".join(s.strip().strip("$").rstrip(".").split()) for s in (got, want))
    try:
        a, b = float(got.replace(",", "")), float(want.replace(",", ""))
    except ValueError:
        return got == want
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


class ExactAnswer:
    """1.0 when the completion's extracted answer equals the row's `column`, 0.0 when not, None when the
    row has no answer. The reference is extracted the same way when it can be (a GSM8K solution ending
    in `#### 72` gives 72), else taken whole."""

    __name__ = "exact_answer"

    def __init__(self, extract: str = "last_number", pattern: str | None = None, column: str = "answer"):
        if extract not in EXTRACTIONS:
            raise ValueError(f"extract must be one of {', '.join(EXTRACTIONS)}, got {extract!r}")
        if (extract == "regex") != (pattern is not None):
            raise ValueError("extract: regex needs a pattern (and only it takes one)")
        self.extract, self.column = extract, column
        self.pattern = None if pattern is None else re.compile(pattern, re.DOTALL)

    def answer(self, text: str) -> str | None:
        """The answer found in `text` by this extraction, or None."""
        if self.extract == "last_number":
            return last_number(text)
        if self.extract == "boxed":
            return last_boxed(text)
        found = list(self.pattern.finditer(text))
        if not found:
            return None
        last = found[-1]
        return last.group(1) if self.pattern.groups else last.group(0)

    def __call__(self, completions, **columns) -> list[float | None]:
        if self.column not in columns:
            names = ", ".join(k for k in columns if k not in ("prompts", "completion_ids")) or "none"
            raise ValueError(f"no column {self.column!r} in the data (columns: {names}); set args.column")
        out = []
        for completion, answer in zip(completions, columns[self.column], strict=True):
            if answer is None:
                out.append(None)
                continue
            want = self.answer(str(answer)) or str(answer)
            got = self.answer(completion_text(completion))
            out.append(1.0 if got is not None and _same(got, want) else 0.0)
        return out


class FormatReward:
    """1.0 when the completion matches `pattern` from its start (re.match with DOTALL and MULTILINE, as
    TRL's `think_format_reward`; end it with `$` to anchor the end), else 0.0."""

    __name__ = "format_reward"

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern, re.DOTALL | re.MULTILINE)

    def __call__(self, completions, **kwargs) -> list[float]:
        return [1.0 if self.pattern.match(completion_text(c)) else 0.0 for c in completions]


class LengthPenalty:
    """DAPO's soft overlong punishment of a completion of n tokens: 0 for n <= max_length - cache,
    (max_length - cache - n) / cache up to max_length, -1 beyond (TRL's `get_soft_overlong_punishment`)."""

    __name__ = "length_penalty"

    def __init__(self, max_length: int, cache: int = 0):
        if not 0 <= cache <= max_length or max_length < 1:
            raise ValueError(f"need 0 <= cache <= max_length and max_length >= 1, got {cache}, {max_length}")
        self.max_length, self.cache = max_length, cache

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        free = self.max_length - self.cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= free else (free - n) / self.cache if n <= self.max_length else -1.0)
        return out


BUILTINS = {"exact_answer": ExactAnswer, "format_reward": FormatReward, "length_penalty": LengthPenalty}
