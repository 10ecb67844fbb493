"""Preference pairs (`format: preference`) for DPO and ORPO: rows -> tokenized (chosen, rejected) pairs.

Three layouts, detected from the first row:
  standard       TRL: `prompt`, `chosen`, `rejected` strings (EOS appended to each response);
  conversational TRL: `prompt` a message list, `chosen` / `rejected` message lists (chat template);
  implicit       TRL conversational without `prompt`: the turns `chosen` and `rejected` share are the prompt;
  sharegpt       LLaMA-Factory ranking: `conversations` (the prompt turns) plus `chosen` / `rejected`
                 turn objects ({"from": "gpt", "value": ...}).
Field names may be renamed with a source's `fields`, including nested paths (`input.messages`).

Tokenized as TRL does: prompt alone and prompt + response are tokenized, the prompt is their common
prefix, the rest is the response. The prompt keeps its last `max_prompt_length` tokens; each sequence is
then cut to `seq_len` from the end (TRL's `keep_start`). A pair whose prompt leaves no response token is
an error (a skip with `data.skip_invalid`). Hand-written rather than through TRL, which needs PyTorch.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxlora.data.build import default_cache_dir
from jaxlora.data.examples import Examples
from jaxlora.data.formats import DEFAULT_ROLES, RowError
from jaxlora.data.loader import BatchLoader
from jaxlora.data.sources import bars_on_terminal_only, load_rows, resolve_source, subset_rows
from jaxlora.data.templates import resolve_chat_template
from jaxlora.data.tokenize import IGNORE
from jaxlora.errors import UserError

log = logging.getLogger("jaxlora.data")

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "messages", "role", "content", "roles")
SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ("input_ids", "targets", "positions", "segment_ids"))


def get_path(row: Mapping, path: str):
    """`row["a"]["b"]` for `path` "a.b" (a literal key with dots wins); None when absent."""
    if path in row:
        return row[path]
    value = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def detect_layout(row: Mapping, names: Mapping) -> str:
    """standard, conversational or sharegpt, from one row."""
    prompt, chosen = get_path(row, names["prompt"]), get_path(row, names["chosen"])
    if isinstance(get_path(row, names["messages"]), list) and isinstance(chosen, Mapping):
        return "sharegpt"
    if isinstance(prompt, list):
        return "conversational"
    if isinstance(prompt, str):
        return "standard"
    if prompt is None and isinstance(chosen, list):
        return "implicit"
    raise RowError(
        f"not a preference row: no '{names['prompt']}' (string or message list) and no "
        f"'{names['messages']}' list with '{names['chosen']}'/'{names['rejected']}' turn objects"
    )


def resolve_names(fields: Mapping | None, columns: list[str]) -> dict:
    fields = dict(fields or {})
    messages = fields.get("messages") or ("conversations" if "conversations" in columns else "messages")
    sharegpt = messages == "conversations"
    names = {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "messages": messages,
        "role": "from" if sharegpt else "role",
        "content": "value" if sharegpt else "content",
    }
    names.update({k: v for k, v in fields.items() if k != "roles"})
    names["roles"] = {**DEFAULT_ROLES, **(fields.get("roles") or {})}
    return names


class PairEncoder:
    """One raw row -> (prompt ids, chosen ids, rejected ids), or `RowError`."""

    def __init__(self, names: dict, layout: str, tokenizer, template: str | None):
        self.names, self.layout, self.tokenizer, self.template = names, layout, tokenizer, template

    def _messages(self, raw, field: str) -> list[dict]:
        if isinstance(raw, Mapping):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise RowError(f"field '{field}' must be a non-empty message list")
        out = []
        for k, msg in enumerate(raw):
            where = f"{field}[{k}]"
            if not isinstance(msg, Mapping):
                raise RowError(f"field '{where}' must be an object")
            role = msg.get(self.names["role"])
            if role not in self.names["roles"]:
                raise RowError(f"field '{where}.{self.names['role']}' has unknown role {role!r}")
            content = msg.get(self.names["content"])
            if not isinstance(content, str) or not content.strip():
                raise RowError(f"field '{where}.{self.names['content']}' is missing or empty")
            out.append({"role": self.names["roles"][role], "content": content})
        return out

    def _field(self, row, key: str):
        value = get_path(row, self.names[key])
        if value is None:
            raise RowError(f"missing field '{self.names[key]}'")
        return value

    def _texts(self, row) -> tuple[str, str, str, bool]:
        """(prompt text, prompt+chosen text, prompt+rejected text, whether special tokens are in the text)."""
        n = self.names
        if self.layout == "standard":
            prompt = self._field(row, "prompt")
            eos = self.tokenizer.eos_token
            sides = []
            for s in SIDES:
                text = self._field(row, s)
                if not isinstance(text, str):
                    raise RowError(f"field '{n[s]}' must be a string, got {type(text).__name__}")
                if not text.strip():
                    raise RowError(f"field '{n[s]}' is an empty response")
                sides.append(text if text.endswith(eos) else text + eos)
            if not isinstance(prompt, str):
                raise RowError(f"field '{n['prompt']}' must be a string")
            return prompt, prompt + sides[0], prompt + sides[1], False
        if self.layout == "implicit":  # the shared leading turns are the prompt, as TRL's extract_prompt
            c, r = (self._messages(self._field(row, s), n[s]) for s in SIDES)
            k = _common_prefix(c, r)
            while k and c[k - 1]["role"] == "assistant" and k == min(len(c), len(r)):
                k -= 1  # a response identical on both sides stays a response
            if k == 0:
                raise RowError(f"fields '{n['chosen']}' and '{n['rejected']}' share no prompt turn")
            prompt, responses = c[:k], (c[k:], r[k:])
        else:
            key = "messages" if self.layout == "sharegpt" else "prompt"
            prompt = self._messages(self._field(row, key), n[key])
            responses = tuple(self._messages(self._field(row, s), n[s]) for s in SIDES)
        for s, resp in zip(SIDES, responses, strict=True):
            if not resp:
                raise RowError(f"field '{n[s]}' is an empty response")
        full = [self._apply(prompt, True)] + [self._apply(prompt + resp, False) for resp in responses]
        return full[0], full[1], full[2], True

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:
            raise RowError(f"chat template failed: {err}") from None

    def __call__(self, row: Mapping) -> tuple[list[int], list[int], list[int]]:
        prompt, chosen, rejected, in_text = self._texts(row)
        texts = (prompt, chosen, rejected)
        # verbose=False: no "longer than the specified maximum sequence length" warning; fit_pair cuts
        ids = [self.tokenizer(t, add_special_tokens=not in_text, verbose=False)["input_ids"] for t in texts]
        cut = min(_common_prefix(ids[0], ids[1]), _common_prefix(ids[0], ids[2]))
        out = ids[0][:cut], ids[1][cut:], ids[2][cut:]
        for s, resp in zip(SIDES, out[1:], strict=True):
            if not resp:
                raise RowError(f"field '{self.names[s]}' is an empty response")
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fit_pair(prompt, chosen, rejected, seq_len: int, max_prompt_length: int | None):
    """Truncate as TRL: the prompt keeps its last `max_prompt_length` tokens, each sequence its first
    `seq_len`. Returns the two records (input_ids, labels with the prompt IGNOREd), or raises `RowError`."""
    if max_prompt_length is not None:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) >= seq_len:
        raise RowError(
            f"the prompt has {len(prompt)} tokens, leaving no room for a response in seq_len {seq_len} "
            "(raise data.seq_len or set prefs.max_prompt_length)"
        )
    records = []
    for resp in (chosen, rejected):
        ids = np.asarray(list(prompt) + list(resp), np.int32)[:seq_len]
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE
        records.append({"input_ids": ids, "labels": labels})
    return records


class Pairs:
    """Tokenized preference pairs: two `Examples` of the same length, row i of each one pair."""

    def __init__(self, chosen: Examples, rejected: Examples, same: int = 0):
        self.chosen, self.rejected, self.same = chosen, rejected, same

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict:
        """The chosen example (prompt tokens carry IGNORE labels), e.g. for sample prompts."""
        return self.chosen[i]

    def select(self, index) -> "Pairs":
        return Pairs(self.chosen.select(index), self.rejected.select(index))

    @classmethod
    def concat(cls, parts: list["Pairs"]) -> "Pairs":
        return cls(
            Examples.concat([p.chosen for p in parts]),
            Examples.concat([p.rejected for p in parts]),
            sum(p.same for p in parts),
        )


@bars_on_terminal_only()
def load_pairs(source, data_cfg, tokenizer, max_prompt_length: int | None = None) -> Pairs:
    """Read and tokenize one `format: preference` source (not cached: pairs sets are small)."""
    if getattr(source, "streaming", False):
        raise UserError(f"{source.path}: format preference cannot stream; set streaming: false")
    resolved = resolve_source(source)
    root = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    rows = load_rows(resolved, streaming=False, cache_dir=str(root / "hf"))
    names = resolve_names(source.fields, list(rows.column_names or []))
    if len(rows) == 0:
        raise UserError(f"{resolved.name}: the dataset has no rows")
    rows, numbers = subset_rows(rows, source, resolved.name)  # max_samples
    try:
        layout = detect_layout(rows[0], names)
    except RowError as err:
        raise UserError(f"{resolved.name}: row 0: {err}") from None
    template = None if layout == "standard" else resolve_chat_template(tokenizer, data_cfg.chat_template)
    encode = PairEncoder(names, layout, tokenizer, template)
    chosen, rejected, same, skipped = [], [], 0, 0
    for i, row in enumerate(rows):
        try:
            p, c, r = encode(row)
            rec_c, rec_r = fit_pair(p, c, r, data_cfg.seq_len, max_prompt_length)
        except RowError as err:
            if not data_cfg.skip_invalid:
                row_number = i if numbers is None else int(numbers[i])
                raise UserError(
                    f"{resolved.name}: row {row_number}: {err} (or set data.skip_invalid: true)"
                ) from None
            skipped += 1
            continue
        same += int(np.array_equal(rec_c["input_ids"], rec_r["input_ids"]))
        chosen.append(rec_c)
        rejected.append(rec_r)
    if skipped:
        log.warning("%s: skipped %d of %d invalid preference rows", resolved.name, skipped, len(rows))
    if same:
        log.warning(
            "%s: %d pairs have chosen equal to rejected (after truncation); they teach nothing",
            resolved.name,
            same,
        )
    if not chosen:
        raise UserError(f"{resolved.name}: no preference pairs left ({skipped} invalid rows skipped)")
    log.info("%s: %d preference pairs (%s layout)", resolved.name, len(chosen), layout)
    return Pairs(Examples.from_records(chosen), Examples.from_records(rejected), same)


def build_pairs(data_cfg, tokenizer, seed: int = 0, max_prompt_length: int | None = None):
    """`(train, validation)` `Pairs` from `data.train` / `data.validation`; every source must be
    `format: preference`. Without validation sources a `validation_split` fraction is held out."""
    for s in (*data_cfg.train, *(data_cfg.validation or ())):
        if s.format != "preference":
            raise UserError(
                f"{s.path}: format {s.format} has no preference pairs; DPO and ORPO need format: preference "
                "(prompt/chosen/rejected) for every source"
            )
    if data_cfg.packing:
        log.info("preference pairs are padded, one per row: data.packing does not apply")
    train = Pairs.concat([load_pairs(s, data_cfg, tokenizer, max_prompt_length) for s in data_cfg.train])
    val_parts = [load_pairs(s, data_cfg, tokenizer, max_prompt_length) for s in (data_cfg.validation or ())]
    val = Pairs.concat(val_parts) if val_parts else None
    if val is None and data_cfg.validation_split > 0 and len(train) > 1:
        n = len(train)
        n_val = min(max(1, round(n * data_cfg.validation_split)), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        val, train = train.select(np.sort(perm[:n_val])), train.select(np.sort(perm[n_val:]))
    return train, val


class PairLoader:
    """Batches of pairs `{chosen_*, rejected_*}` (the `BatchLoader` keys, each int32 [local, seq_len]).

    Two `BatchLoader`s without packing over the same order (same seed and length), so row i of both
    batches is one pair; the position, `state()` and `restore()` are the chosen loader's.
    """

    def __init__(self, pairs: Pairs, batch_size: int, seq_len: int, **kwargs):
        kwargs["packing"] = False
        self.loaders = [BatchLoader(getattr(pairs, s), batch_size, seq_len, **kwargs) for s in SIDES]

    @property
    def examples(self) -> Examples:
        """The chosen side (its lengths describe the data)."""
        return self.loaders[0].examples

    @property
    def num_batches_per_epoch(self):
        return self.loaders[0].num_batches_per_epoch

    def batches_in_epoch(self, epoch: int):
        return self.loaders[0].batches_in_epoch(epoch)

    def __iter__(self) -> "PairLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = {}
        for side, loader in zip(SIDES, self.loaders, strict=True):
            out.update({f"{side}_{k}": v for k, v in next(loader).items()})
        return out

    def state(self) -> dict[str, int]:
        return self.loaders[0].state()

    def restore(self, state) -> None:
        for loader in self.loaders:
            loader.restore(state)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
