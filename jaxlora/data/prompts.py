"""`format: prompt` rows for online RL (GRPO): prompts the model completes, with the row's other columns
kept for the reward functions (`answer`, `solution`, ...), as TRL's `GRPOTrainer` reads its dataset.

A row's `prompt` (renamed with `fields: {prompt: question}`) is either a string, tokenized as is (with
the tokenizer's own special tokens, e.g. BOS), or a list of messages (`role`, `content`), rendered with
the chat template and its generation prompt. A prompt longer than `max_prompt_length` tokens keeps its
last tokens (left truncation, as TRL).

    train, val = build_prompts(data_cfg, tokenizer, seed, max_prompt_length)
    loader = PromptLoader(train, prompts_per_step, seed=seed)
    index = next(loader)          # [P] int: rows of `train` for one optimizer step
"""

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxlora.data.build import default_cache_dir
from jaxlora.data.loader import loader_position
from jaxlora.data.sources import bars_on_terminal_only, load_rows, resolve_source, subset_rows
from jaxlora.data.templates import resolve_chat_template
from jaxlora.errors import UserError

__all__ = ["PromptLoader", "Prompts", "build_prompts", "load_prompts"]

log = logging.getLogger("jaxlora.data")


@dataclasses.dataclass
class Prompts:
    """Tokenized prompts: row i is `ids[i]` (token ids), `prompts[i]` (the text or messages the reward
    functions see), `rows[i]` ("5 of data.jsonl": its row in its source, for errors) and
    `columns[name][i]`."""

    ids: list[list[int]]
    prompts: list
    rows: list[str]
    columns: dict[str, list]

    @property
    def size(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """[N] int: each prompt's tokens (the run's start summary reads them)."""
        return np.array([len(i) for i in self.ids], np.int64)

    @property
    def max_length(self) -> int:
        return max(len(i) for i in self.ids)

    def select(self, index) -> "Prompts":
        index = [int(i) for i in index]
        return Prompts(
            [self.ids[i] for i in index],
            [self.prompts[i] for i in index],
            [self.rows[i] for i in index],
            {k: [v[i] for i in index] for k, v in self.columns.items()},
        )

    @staticmethod
    def concat(parts: list["Prompts"]) -> "Prompts":
        names = set.intersection(*(set(p.columns) for p in parts))  # columns every source has
        return Prompts(
            [i for p in parts for i in p.ids],
            [t for p in parts for t in p.prompts],
            [r for p in parts for r in p.rows],
            {k: [v for p in parts for v in p.columns[k]] for k in sorted(names)},
        )


def _messages(prompt: list, names: Mapping, where: str) -> list[dict]:
    out = []
    for m in prompt:
        if not isinstance(m, Mapping) or names["role"] not in m or names["content"] not in m:
            raise UserError(f"{where}: each prompt message needs '{names['role']}' and '{names['content']}'")
        out.append({"role": m[names["role"]], "content": m[names["content"]]})
    return out


def _encode(prompt, names, tokenizer, template, where: str) -> tuple[list[int], object]:
    """(token ids, what the reward functions see) of one row's prompt."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"]), prompt
    if isinstance(prompt, list):
        messages = _messages(prompt, names, where)
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), messages
    raise UserError(
        f"{where}: '{names['prompt']}' must be a string or a list of messages, got {type(prompt).__name__}; "
        "name the prompt column with fields: {prompt: COLUMN}"
    )


@bars_on_terminal_only()
def load_prompts(source, data_cfg, tokenizer, max_prompt_length: int | None = None) -> Prompts:
    """Read and tokenize one `format: prompt` source (not cached: prompt sets are small)."""
    if getattr(source, "streaming", False):
        raise UserError(f"{source.path}: format prompt cannot stream; set streaming: false")
    resolved = resolve_source(source)
    root = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    rows = load_rows(resolved, streaming=False, cache_dir=str(root / "hf"))
    fields = dict(source.fields or {})
    names = {"prompt": fields.get("prompt", "prompt"), "role": fields.get("role", "role")}
    names["content"] = fields.get("content", "content")
    if len(rows) == 0:
        raise UserError(f"{resolved.name}: the dataset has no rows")
    if names["prompt"] not in rows.column_names:
        raise UserError(
            f"{resolved.name}: no column '{names['prompt']}' (columns: {', '.join(rows.column_names)}); "
            "name the prompt column with fields: {prompt: COLUMN}"
        )
    rows, numbers = subset_rows(rows, source, resolved.name)  # max_samples
    needs_template = isinstance(rows[0][names["prompt"]], list)
    template = resolve_chat_template(tokenizer, data_cfg.chat_template) if needs_template else None
    others = [c for c in rows.column_names if c != names["prompt"]]
    out = Prompts([], [], [], {c: [] for c in others})
    for i, row in enumerate(rows):
        number = i if numbers is None else int(numbers[i])
        where = f"{resolved.name}: row {number}"
        ids, shown = _encode(row[names["prompt"]], names, tokenizer, template, where)
        if not ids:
            raise UserError(f"{where}: the prompt is empty; give every row a prompt")
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        out.ids.append(ids)
        out.prompts.append(shown)
        out.rows.append(f"{number} of {resolved.name}")  # as `score` names a row in its errors
        for c in others:
            out.columns[c].append(row[c])
    return out


def build_prompts(data_cfg, tokenizer, seed: int = 0, max_prompt_length: int | None = None):
    """`(train, validation or None)` `Prompts` from `data.train` / `data.validation`, every source
    `format: prompt`; without validation sources a `validation_split` fraction is held out."""
    for s in (*data_cfg.train, *(data_cfg.validation or ())):
        if s.format != "prompt":
            raise UserError(
                f"{s.path}: format {s.format} has no prompts; GRPO needs format: prompt for every source"
            )
    train = Prompts.concat([load_prompts(s, data_cfg, tokenizer, max_prompt_length) for s in data_cfg.train])
    parts = [load_prompts(s, data_cfg, tokenizer, max_prompt_length) for s in (data_cfg.validation or ())]
    val = Prompts.concat(parts) if parts else None
    if val is None and data_cfg.validation_split > 0 and train.size > 1:
        n = train.size
        n_val = min(max(1, round(n * data_cfg.validation_split)), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        val, train = train.select(np.sort(perm[:n_val])), train.select(np.sort(perm[n_val:]))
    return train, val


class PromptLoader:
    """The rows of `prompts` for each optimizer step, `per_step` at a time, epoch after epoch (each
    epoch shuffled by `seed` and the epoch with `shuffle`; a last partial batch is dropped). Resumable:
    `state()` / `restore()` as `BatchLoader`'s."""

    def __init__(self, prompts: Prompts, per_step: int, *, shuffle: bool = True, seed: int = 0):
        if prompts.size < per_step:
            raise UserError(
                f"{prompts.size} prompts are fewer than the {per_step} one step samples "
                "(train.batch_size x grad_accum_steps / grpo.num_generations); add prompts or lower those"
            )
        self.prompts, self.per_step, self.shuffle, self.seed = prompts, per_step, shuffle, seed
        self._epoch, self._step = 0, 0

    @property
    def examples(self) -> Prompts:
        return self.prompts

    @property
    def num_batches_per_epoch(self) -> int:
        return self.prompts.size // self.per_step

    def _order(self, epoch: int) -> np.ndarray:
        n = self.prompts.size
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> np.ndarray:
        """[P] int: the rows of the next step's prompts."""
        start = self._step * self.per_step
        index = self._order(self._epoch)[start : start + self.per_step]
        self._step += 1
        if self._step >= self.num_batches_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return index

    def state(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "step": int(self._step)}

    def restore(self, state: Mapping[str, int]) -> None:
        epoch, step = loader_position(state, "prompt")
        if epoch < 0 or not 0 <= step < self.num_batches_per_epoch:
            raise UserError(
                f"prompt loader state {dict(state)!r} does not fit {self.num_batches_per_epoch} steps per "
                "epoch; was the data, batch_size or num_generations changed?"
            )
        self._epoch, self._step = epoch, step

    def close(self) -> None:
        pass
