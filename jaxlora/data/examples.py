"""`Examples`: tokenized examples (input_ids, labels) read straight from Arrow without copies.

Backed by the memory-mapped Arrow tables of one or more `datasets.Dataset`s; `select` makes a view
through an index array, so a validation split costs no copy of the data.
"""

from collections.abc import Iterable, Mapping

import datasets
import numpy as np


class _Part:
    """One contiguous block: flat token and label arrays plus offsets (n + 1) into them."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, label_shift: int = 0):
        self.ids, self.labels, self.offsets, self.label_shift = ids, labels, offsets, label_shift

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _list_chunk(chunk) -> tuple[np.ndarray, np.ndarray]:
    offsets = chunk.offsets.to_numpy().astype(np.int64)
    return chunk.values.to_numpy(zero_copy_only=False), offsets


class Examples:
    """A sequence of tokenized examples; `ex[i]` is `{"input_ids": int32[L], "labels": int32[L]}`.

    `labels` are not shifted: `labels[t]` is `input_ids[t]` where token t is trained, else IGNORE. The
    batch loader shifts them into `targets`.
    """

    def __init__(self, parts: list[_Part], index: np.ndarray | None = None):
        self._parts = parts
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._index = index
        lengths = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, np.int64)
        self.lengths = lengths if index is None else lengths[index]

    @classmethod
    def from_dataset(cls, ds: datasets.Dataset) -> "Examples":
        """View a `datasets.Dataset` with `input_ids` and `labels` list columns."""
        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        table = ds.data.table
        parts = []
        for ids_chunk, lab_chunk in zip(
            table.column("input_ids").chunks, table.column("labels").chunks, strict=True
        ):
            ids, offsets = _list_chunk(ids_chunk)
            labels, lab_offsets = _list_chunk(lab_chunk)
            if not np.array_equal(offsets - offsets[0], lab_offsets - lab_offsets[0]):
                raise ValueError("input_ids and labels differ in length")
            # The two columns may start at different places in their value buffers.
            parts.append(_Part(ids, labels, offsets, label_shift=int(lab_offsets[0] - offsets[0])))
        return cls(parts)

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> "Examples":
        """Build from dicts with `input_ids` and optional `labels` (default: train on every token)."""
        ids, labels, offsets = [], [], [0]
        for r in records:
            x = np.asarray(r["input_ids"], dtype=np.int32)
            y = np.asarray(r["labels"], dtype=np.int32) if r.get("labels") is not None else x.copy()
            if x.shape != y.shape:
                raise ValueError("input_ids and labels differ in length")
            ids.append(x)
            labels.append(y)
            offsets.append(offsets[-1] + len(x))
        cat = (lambda xs: np.concatenate(xs)) if ids else (lambda xs: np.zeros(0, np.int32))
        return cls([_Part(cat(ids), cat(labels), np.asarray(offsets, dtype=np.int64))])

    @classmethod
    def concat(cls, parts: list["Examples"]) -> "Examples":
        """Join several `Examples` (their views are materialised as index arrays)."""
        all_parts, index, base = [], [], 0
        for ex in parts:
            all_parts.extend(ex._parts)
            own = ex._index if ex._index is not None else np.arange(ex._starts[-1])
            index.append(own + base)
            base += int(ex._starts[-1])
        flat = np.concatenate(index) if index else np.zeros(0, np.int64)
        return cls(all_parts, None if len(flat) == base and np.array_equal(flat, np.arange(base)) else flat)

    def select(self, index) -> "Examples":
        """A view of the examples at `index` (positions in this sequence)."""
        index = np.asarray(index, dtype=np.int64)
        base = index if self._index is None else self._index[index]
        return Examples(self._parts, base)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        j = int(self._index[i]) if self._index is not None else int(i) % len(self)
        p = int(np.searchsorted(self._starts, j, side="right")) - 1
        part = self._parts[p]
        k = j - int(self._starts[p])
        a, b = int(part.offsets[k]), int(part.offsets[k + 1])
        shift = part.label_shift
        return {"input_ids": part.ids[a:b], "labels": part.labels[a + shift : b + shift]}
