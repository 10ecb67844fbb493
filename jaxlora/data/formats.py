"""Dataset formats: turn one raw row into text plus the character spans of its responses.

A `Rendered` row is the exact string the model reads and the spans (start, end) of the text it must learn
to produce. Tokenization (tokenize.py) turns spans into labels, so masking comes from the row's structure.
Each format checks its fields and raises `RowError` naming the field; the caller adds file and row.
The format names and a source's `fields` keys are validated by the config (`jaxlora.data.config`).
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from jaxlora.data.templates import alpaca_prompt
from jaxlora.errors import UserError

# The field names each format reads; a source's `fields` mapping may rename any of them.
# chat: the messages column, the role and content keys of each message, and `roles` (a mapping of the
# dataset's role names); its defaults follow the data (see `resolve_fields`).
# alpaca: `system` (a system prompt, replacing the standard preamble) and `history` (earlier
# [instruction, response] pairs) are optional. chat: `tools` (optional) holds the function schemas, a list
# or a JSON string of one, passed to the chat template as `tools`.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "chat": ("messages", "role", "content", "roles", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    # DPO/ORPO pairs (jaxlora.data.preference): TRL standard or conversational, or ShareGPT ranking.
    "preference": ("prompt", "chosen", "rejected", "messages", "role", "content", "roles"),
    # GRPO prompts (jaxlora.data.prompts): a string or a message list; the other columns go to the rewards.
    "prompt": ("prompt", "role", "content"),
}
FORMATS = tuple(FORMAT_FIELDS)

# ShareGPT and OpenAI role names -> the roles chat templates expect. As in LLaMA-Factory's ShareGPT
# reader, a `function_call` turn is the assistant's (trained: the model learns to call) and an
# `observation` (the function's result) is the tool's.
DEFAULT_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}


class RowError(Exception):
    """A bad row; the message names the field (file and row are added by the caller)."""


@dataclass(frozen=True)
class Rendered:
    """A row as text, with the character spans of the responses (trained, each followed by EOS)."""

    text: str
    spans: tuple[tuple[int, int], ...]


def _text(row: Mapping, field: str, *, optional: bool = False, label: str | None = None) -> str | None:
    value = row.get(field)
    label = label or field
    if value is None:
        if optional:
            return None
        raise RowError(f"missing field '{label}'")
    if not isinstance(value, str):
        raise RowError(f"field '{label}' must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise RowError(f"field '{label}' is empty")
    return value


def resolve_fields(fmt: str, fields: Mapping | None, columns: list[str]) -> dict:
    """Field names for `fmt`: the defaults, overridden by the source's `fields` mapping.

    For `chat` the defaults follow the data: a `messages` column means OpenAI style (role/content), a
    `conversations` column means ShareGPT (from/value).
    """
    fields = dict(fields or {})
    if fmt != "chat":
        names = {name: name for name in FORMAT_FIELDS[fmt]}
    else:
        messages = fields.get("messages")
        if messages is None:
            sharegpt_columns = "conversations" in columns and "messages" not in columns
            messages = "conversations" if sharegpt_columns else "messages"
        sharegpt = messages == "conversations"
        names = {
            "messages": messages,
            "role": "from" if sharegpt else "role",
            "content": "value" if sharegpt else "content",
            "tools": "tools",
        }
        names["roles"] = {**DEFAULT_ROLES, **(fields.get("roles") or {})}
    names.update({k: v for k, v in fields.items() if k != "roles"})
    return names


def row_columns(fmt: str, names: Mapping) -> list[str]:
    """The top-level columns a row of `fmt` is read from, under their resolved `names` (chat: only the
    messages column; role and content are keys inside each message)."""
    keys = ("messages", "tools") if fmt == "chat" else FORMAT_FIELDS[fmt]
    return [names[k] for k in keys]


def make_renderer(fmt: str, names: dict, tokenizer=None, chat_template: str | None = None) -> Callable:
    """A function row -> `Rendered` for format `fmt` with resolved field `names`."""
    if fmt == "prompt":  # no response to learn: the model writes its own (jaxlora.data.prompts)
        raise UserError("format prompt holds prompts for train.objective grpo, not sft or dpo")
    simple = {"alpaca": _render_alpaca, "prompt_completion": _render_prompt_completion, "text": _render_text}
    if fmt in simple:
        return partial(simple[fmt], names=names)
    return _ChatRenderer(names, tokenizer, chat_template)


def _render_alpaca(row: Mapping, names: dict) -> Rendered:
    instruction = _text(row, names["instruction"])
    input_text = _text(row, names["input"], optional=True)
    output = _text(row, names["output"])
    system = _text(row, names["system"], optional=True)
    turns = _history(row, names["history"])
    if not turns and not (system and system.strip()):
        prompt = alpaca_prompt(instruction, input_text)
        return Rendered(prompt + output, ((len(prompt), len(prompt) + len(output)),))
    text, spans = "", []
    for k, (question, answer) in enumerate([*turns, (instruction, output)]):
        last = k == len(turns)
        prompt = alpaca_prompt(question, input_text if last else None, system=system, first=k == 0)
        text += ("" if k == 0 else "\n\n") + prompt
        spans.append((len(text), len(text) + len(answer)))  # every response is trained, as the last
        text += answer
    return Rendered(text, tuple(spans))


def _history(row: Mapping, field: str) -> list[tuple[str, str]]:
    """Alpaca `history`: earlier turns as [instruction, response] pairs (absent or null: none)."""
    value = row.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(f"field '{field}' must be a list of [instruction, response] pairs")
    turns = []
    for k, pair in enumerate(value):
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok or not pair[1].strip():
            raise RowError(
                f"field '{field}[{k}]' must be an [instruction, response] pair of non-empty strings"
            )
        turns.append((pair[0], pair[1]))
    return turns


def _render_prompt_completion(row: Mapping, names: dict) -> Rendered:
    prompt = _text(row, names["prompt"])
    completion = _text(row, names["completion"])
    return Rendered(prompt + completion, ((len(prompt), len(prompt) + len(completion)),))


def _render_text(row: Mapping, names: dict) -> Rendered:
    text = _text(row, names["text"])
    return Rendered(text, ((0, len(text)),))


class _ChatRenderer:
    """Renders a conversation with a Jinja chat template and finds each assistant turn's span.

    The span of assistant message i runs from the end of the rendered prefix `messages[:i]` with the
    generation prompt to the end of the rendered prefix `messages[:i+1]` (trailing whitespace dropped), so
    it covers the content and the template's end-of-turn marker but not the role header. Templates whose
    renderings are not prefixes of each other fall back to locating the content itself.
    """

    def __init__(self, names: dict, tokenizer, template: str):
        self.names = names
        self.tokenizer = tokenizer
        self.template = template
        self.tools = None  # the current row's function schemas

    def _tools(self, row: Mapping) -> list | None:
        """The row's `tools`: a list of function schemas, or a JSON string of one (ShareGPT)."""
        field = self.names["tools"]
        value = row.get(field)
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RowError(
                    f"field '{field}' is not valid JSON ({err.msg} at column {err.colno})"
                ) from None
        if value is None or value == []:
            return None
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
            raise RowError(f"field '{field}' must be a list of function schemas (objects)")
        return [dict(t) for t in value]

    def _messages(self, row: Mapping) -> list[dict]:
        field, role_key, content_key = self.names["messages"], self.names["role"], self.names["content"]
        raw = row.get(field)
        if raw is None:
            raise RowError(f"missing field '{field}'")
        if not isinstance(raw, list):
            raise RowError(f"field '{field}' must be a list of messages, got {type(raw).__name__}")
        if not raw:
            raise RowError(f"field '{field}' is empty")
        messages = []
        for k, msg in enumerate(raw):
            where = f"{field}[{k}]"
            if not isinstance(msg, Mapping):
                raise RowError(f"field '{where}' must be an object, got {type(msg).__name__}")
            role = msg.get(role_key)
            if role is None:
                raise RowError(f"missing field '{where}.{role_key}'")
            if role not in self.names["roles"]:
                known = ", ".join(sorted(self.names["roles"]))
                raise RowError(f"field '{where}.{role_key}' has unknown role {role!r} (known: {known})")
            role = self.names["roles"][role]
            if role == "system" and isinstance(msg.get(content_key), str) and not msg[content_key].strip():
                continue  # an empty system prompt is the same as none
            content = _text(msg, content_key, label=f"{where}.{content_key}")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(f"field '{field}' has no assistant message")
        return messages

    def _apply(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=self.tools,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except ImportError as err:  # jinja2 missing: an install problem, not a data problem
            raise UserError(f"chat templates need jinja2 ({err}); pip install jinja2") from None
        except Exception as err:  # the template's own raise_exception, or a Jinja error
            raise RowError(f"field '{self.names['messages']}': chat template failed: {err}") from None

    def __call__(self, row: Mapping) -> Rendered:
        messages = self._messages(row)
        self.tools = self._tools(row)
        full = self._apply(messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            span = None
            if i > 0:
                head = self._apply(messages[:i], generation_prompt=True)
                upto = full if i == len(messages) - 1 else self._apply(messages[: i + 1])
                end = len(upto.rstrip())
                if full.startswith(upto) and upto.startswith(head) and cursor <= len(head) < end:
                    span = (len(head), end)
            if span is None:
                content = msg["content"].strip()
                start = full.find(content, cursor)
                if start < 0:
                    field = f"{self.names['messages']}[{i}]"
                    raise RowError(f"field '{field}': the chat template dropped the content")
                span = (start, start + len(content))
            spans.append(span)
            cursor = span[1]
        return Rendered(full, tuple(spans))
