"""Tokenize rendered rows into `input_ids` and `labels` (-100 where there is no loss).

Labels come from structure, never from token ids: a token is trained when its character span overlaps a
response span of the rendered row. An EOS token is inserted after every response (unless the response
already ends with one), BOS is prepended once when the tokenizer uses one, and nothing is ever compared
with `pad_token_id`.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from jaxlora.data.formats import Rendered
from jaxlora.errors import UserError

IGNORE = -100  # the label and target of tokens without loss (PyTorch's ignore_index)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the pipeline needs from a tokenizer: BOS/EOS ids, whether BOS is added, and a fingerprint."""

    bos_id: int | None
    eos_id: int
    add_bos: bool
    fingerprint: str


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """Inspect a Hugging Face fast tokenizer (raises `UserError` if it cannot be used)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the data pipeline needs a fast tokenizer (tokenizer.json); this one is not fast")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no eos_token; set one in tokenizer_config.json")
    bos_id = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id]
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([special, bos_id, eos_id, add_bos]).encode())
    return TokenizerInfo(bos_id, eos_id, add_bos, h.hexdigest()[:16])


class _Encoded:
    """Token ids of one text and a way to find the tokens overlapping a character span."""

    def __init__(self, ids, encoding=None, offsets=None):
        self.ids = np.fromiter(ids, dtype=np.int32, count=len(ids))
        self.encoding, self.offsets = encoding, offsets

    def _chars(self, t: int) -> tuple[int, int]:
        if self.encoding is not None:
            return self.encoding.token_to_chars(t) or (-1, -1)
        return tuple(self.offsets[t])

    def _token_at(self, c: int) -> int | None:
        if self.encoding is not None:
            return self.encoding.char_to_token(c)
        hit = next((t for t, (a, b) in enumerate(self.offsets) if a <= c < b), None)
        return hit

    def span(self, s: int, e: int) -> tuple[int, int] | None:
        """First and last token overlapping characters [s, e), or None when no token does."""
        first = next((t for c in range(s, e) if (t := self._token_at(c)) is not None), None)
        if first is None:
            return None
        last = next(t for c in range(e - 1, s - 1, -1) if (t := self._token_at(c)) is not None)
        n = len(self.ids)
        while first > 0 and self._chars(first - 1)[1] > s:  # byte tokens of one character share offsets
            first -= 1
        while last + 1 < n and 0 <= self._chars(last + 1)[0] < e:
            last += 1
        return first, last


def _encode_batch(tokenizer, texts: list[str]) -> list[_Encoded]:
    """Tokenize without special tokens, truncation or padding."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:  # the fast path: no per-call settings
        return [_Encoded(e.ids, encoding=e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,  # lengths are checked by the caller against seq_len, not model_max_length
    )
    return [_Encoded(i, offsets=o) for i, o in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def encode_rendered(
    tokenizer, info: TokenizerInfo, rows: list[Rendered], train_on_inputs: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize rendered rows in one batched call; returns (input_ids, labels) int32 arrays per row."""
    if not rows:
        return []
    out = []
    for row, enc in zip(rows, _encode_batch(tokenizer, [r.text for r in rows]), strict=True):
        ids = enc.ids
        trained = np.zeros(len(ids), dtype=bool)
        eos_at = []
        for s, e in row.spans:
            hit = enc.span(s, e)
            if hit is None:
                continue
            trained[hit[0] : hit[1] + 1] = True
            if ids[hit[1]] != info.eos_id:
                eos_at.append(hit[1] + 1)
        if train_on_inputs:
            trained[:] = True
        labels = np.where(trained, ids, IGNORE).astype(np.int32)
        if eos_at:
            ids = np.insert(ids, eos_at, info.eos_id)
            labels = np.insert(labels, eos_at, info.eos_id)
        if info.add_bos and (len(ids) == 0 or ids[0] != info.bos_id):
            ids = np.concatenate([[info.bos_id], ids]).astype(np.int32)
            labels = np.concatenate([[IGNORE], labels]).astype(np.int32)
        out.append((ids, labels))
    return out


def chunk_tokens(ids: list[np.ndarray], labels: list[np.ndarray], size: int) -> tuple[list, list]:
    """Concatenate token streams and cut them into pieces of `size` tokens (the last may be shorter)."""
    if not ids:
        return [], []
    flat_ids, flat_labels = np.concatenate(ids), np.concatenate(labels)
    cuts = range(0, len(flat_ids), size)
    out_ids = [flat_ids[i : i + size] for i in cuts]
    out_labels = [flat_labels[i : i + size] for i in cuts]
    if len(out_ids[-1]) < 2:  # a lone token has nothing to predict
        out_ids, out_labels = out_ids[:-1], out_labels[:-1]
    return out_ids, out_labels
