"""Packing examples into fixed-length rows, and turning rows into the batch arrays the train step reads.

A row holds one or more whole examples. Each example gets its own segment id (1, 2, ...; 0 is padding)
and positions restarting at 0, so attention masked by segment never crosses examples and a packed row's
loss is the sum of its examples' losses. Targets are shifted inside each example: `targets[t]` is the
example's next token after `input_ids[t]`, or `IGNORE` (-100: prompt tokens, an example's last token,
padding).
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

from jaxlora.data.tokenize import IGNORE

T = TypeVar("T")


def pack_rows(items: Iterable[tuple[T, int]], seq_len: int, window: int = 16) -> Iterator[list[T]]:
    """Group (item, length) pairs into rows of at most `seq_len` tokens, in a deterministic order.

    Best fit over a window of `window` open rows: an item goes to the open row with the least room that
    still fits it; when none fits and the window is full, the fullest open row is emitted. Full rows are
    emitted at once, the rest at the end in the order they were opened. Works on streams too.
    """
    rows: list[list[T]] = []
    free: list[int] = []
    for item, n in items:
        if n > seq_len:
            raise ValueError(f"example of {n} tokens does not fit seq_len {seq_len}")
        best, room = -1, seq_len + 1
        for j, f in enumerate(free):
            if n <= f < room:
                best, room = j, f
        if best < 0:
            if len(rows) == window:
                j = int(np.argmin(free))
                yield rows.pop(j)
                free.pop(j)
            rows.append([item])
            free.append(seq_len - n)
            best = len(rows) - 1
        else:
            rows[best].append(item)
            free[best] -= n
        if free[best] == 0:
            yield rows.pop(best)
            free.pop(best)
    yield from rows


def make_batch(rows: Sequence[Sequence[Mapping]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Arrays [len(rows), seq_len] for rows of examples (dicts with `input_ids` and unshifted `labels`).

    Returns `input_ids`, `targets` (shifted, IGNORE where no loss), `positions`, `segment_ids`, all int32;
    padding is on the right with `pad_id`, segment 0 and target IGNORE.
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int32)
    targets = np.full((b, seq_len), IGNORE, dtype=np.int32)
    positions = np.zeros((b, seq_len), dtype=np.int32)
    segment_ids = np.zeros((b, seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        t = 0
        for seg, ex in enumerate(row, start=1):
            x, y = ex["input_ids"], ex["labels"]
            n = len(x)
            if t + n > seq_len:
                raise ValueError(f"row {r} holds {t + n} tokens, more than seq_len {seq_len}")
            input_ids[r, t : t + n] = x
            targets[r, t : t + n - 1] = y[1:]
            positions[r, t : t + n] = np.arange(n, dtype=np.int32)
            segment_ids[r, t : t + n] = seg
            t += n
    return {"input_ids": input_ids, "targets": targets, "positions": positions, "segment_ids": segment_ids}
