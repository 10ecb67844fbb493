"""`BatchLoader`: deterministic, resumable, host-sharded batches, built ahead in a background thread.

Every host computes the same plan for an epoch from `(seed, epoch)`: the example order, the packed rows
and the global batches of `batch_size` rows. Host `process_index` takes rows
`[process_index * local, (process_index + 1) * local)` of each global batch, `local = batch_size /
process_count`, so hosts see disjoint slices. The position is `(epoch, step)`, the next global batch to
give; `state()` returns it and `restore()` (or `start_state=`) resumes exactly there.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Mapping

import datasets
import numpy as np

from jaxlora.data.examples import Examples
from jaxlora.data.packing import make_batch, pack_rows
from jaxlora.errors import UserError

_END = object()


def _check_sizes(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
    """Raise UserError unless the batch splits evenly over the hosts and a row holds a target."""
    if batch_size < 1 or seq_len < 2:
        raise UserError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} out of range for process_count {process_count}")
    if batch_size % process_count:
        raise UserError(f"batch_size {batch_size} is not divisible by process_count {process_count}")


def _as_examples(examples, seq_len: int) -> Examples:
    """`examples` (an `Examples`, a `datasets.Dataset` or a list of dicts) as `Examples`, checked: not
    empty, and none longer than `seq_len`."""
    if isinstance(examples, datasets.Dataset):
        examples = Examples.from_dataset(examples)
    elif not isinstance(examples, Examples):
        examples = Examples.from_records(examples)
    if len(examples) == 0:
        raise UserError("no examples to load: the dataset is empty")
    too_long = np.flatnonzero(examples.lengths > seq_len)
    if too_long.size:
        i = int(too_long[0])
        raise UserError(
            f"example {i} has {int(examples.lengths[i])} tokens, more than seq_len {seq_len}; "
            "build the data with the same seq_len"
        )
    return examples


class BatchLoader:
    """Iterate batches `{"input_ids", "targets", "positions", "segment_ids"}`, each int32 [local, seq_len].

    Args:
      examples: `Examples` (from `build_datasets`), a `datasets.Dataset` or list of dicts with
        `input_ids`/`labels`, or a `datasets.IterableDataset` (streaming: packed on the fly).
      batch_size: global batch size in rows; each host gets `batch_size // process_count` rows.
      seq_len: row length in tokens.
      packing: pack several examples per row (default); else one example per row, right-padded.
      shuffle, seed: the order of each epoch is a permutation drawn from `(seed, epoch)`.
      process_index, process_count: this host and the number of hosts.
      num_epochs: epochs to give before stopping; `None` for endless.
      prefetch: batches built ahead in a background thread (0: build on demand in the caller).
      drop_last: drop an epoch's last partial global batch (default); else pad it with empty rows.
      pad_id: token id written in padding (never read: padding has segment 0 and target IGNORE).
      start_state: a `state()` dict to resume from.
      transform: applied to each batch in the background thread (e.g. a `jax.device_put`).
      shuffle_buffer: shuffle buffer for streaming datasets.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        seq_len: int,
        *,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = 1,
        prefetch: int = 2,
        drop_last: bool = True,
        pad_id: int = 0,
        start_state: Mapping[str, int] | None = None,
        transform: Callable | None = None,
        shuffle_buffer: int = 10_000,
        pack_window: int = 16,
    ):
        _check_sizes(batch_size, seq_len, process_index, process_count)
        self.stream = examples if isinstance(examples, datasets.IterableDataset) else None
        self.examples = examples if self.stream is not None else _as_examples(examples, seq_len)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.local_batch_size = batch_size // process_count
        self.packing, self.shuffle, self.seed = packing, shuffle, seed
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs, self.prefetch, self.drop_last = num_epochs, prefetch, drop_last
        self.pad_id, self.transform, self.shuffle_buffer = pad_id, transform, shuffle_buffer
        self.pack_window = pack_window
        self._plans: dict[int, list] = {}
        self._plan_lock = threading.Lock()
        self._epoch, self._step = 0, 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync: Iterator | None = None
        if self.stream is None and self.batches_in_epoch(0) == 0:
            rows = len(self._plan(0))
            raise UserError(
                f"the data gives {rows} rows of {seq_len} tokens, fewer than batch_size {batch_size}; "
                "lower batch_size or use more data"
            )
        if start_state is not None:
            self.restore(start_state)

    # --- plan -----------------------------------------------------------------------------------

    def _order(self, epoch: int, rng) -> np.ndarray:
        n = len(self.examples)
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def _plan(self, epoch: int) -> list:
        """Rows (lists of example indices) of an epoch, in batch order; the same on every host."""
        with self._plan_lock:
            if epoch not in self._plans:
                rng = np.random.default_rng([self.seed, epoch])
                order = self._order(epoch, rng)
                lengths = self.examples.lengths
                if self.packing:
                    rows = list(
                        pack_rows(((int(i), int(lengths[i])) for i in order), self.seq_len, self.pack_window)
                    )
                else:
                    rows = [[int(i)] for i in order]
                if len(self._plans) >= 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = rows
            return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int | None:
        """Global batches in `epoch` (`None` for a stream, whose length is unknown)."""
        if self.stream is not None:
            return None
        rows = len(self._plan(epoch))
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    @property
    def num_batches_per_epoch(self) -> int | None:
        """Global batches in the first epoch (with shuffled packing later epochs may differ by a few)."""
        return self.batches_in_epoch(0)

    def total_batches(self) -> int | None:
        """Exact batches over all `num_epochs` (`None` when endless or streaming)."""
        if self.num_epochs is None or self.stream is not None:
            return None
        return sum(self.batches_in_epoch(e) for e in range(self.num_epochs))

    # --- building -------------------------------------------------------------------------------

    def _assemble(self, rows: list[list]) -> dict[str, np.ndarray]:
        """The local slice of one global batch of rows (rows hold examples as dicts)."""
        rows = rows + [[] for _ in range(self.batch_size - len(rows))]
        lo = self.process_index * self.local_batch_size
        return make_batch(rows[lo : lo + self.local_batch_size], self.seq_len, self.pad_id)

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[int, dict]]:
        if self.stream is not None:
            yield from self._stream_batches(epoch, start)
            return
        rows = self._plan(epoch)
        for step in range(start, self.batches_in_epoch(epoch)):
            chunk = rows[step * self.batch_size : (step + 1) * self.batch_size]
            lo = self.process_index * self.local_batch_size  # read only this host's rows
            examples = [[] for _ in chunk]
            for k in range(lo, min(lo + self.local_batch_size, len(chunk))):
                examples[k] = [self.examples[i] for i in chunk[k]]
            yield step, self._assemble(examples)

    def _stream_batches(self, epoch: int, start: int) -> Iterator[tuple[int, dict]]:
        ds = self.stream
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
        items = (
            {"input_ids": np.asarray(r["input_ids"], np.int32), "labels": np.asarray(r["labels"], np.int32)}
            for r in ds
        )
        sized = ((ex, self._fits(len(ex["input_ids"]))) for ex in items)
        rows = pack_rows(sized, self.seq_len, self.pack_window) if self.packing else ([ex] for ex, _ in sized)
        step, batch = 0, []
        for row in rows:
            batch.append(row)
            if len(batch) == self.batch_size:
                if step >= start:
                    yield step, self._assemble(batch)
                step, batch = step + 1, []
        if batch and not self.drop_last and step >= start:
            yield step, self._assemble(batch)

    def _fits(self, n: int) -> int:
        if n > self.seq_len:
            raise UserError(
                f"a streamed example has {n} tokens, more than seq_len {self.seq_len}; "
                "build the data with the same seq_len"
            )
        return n

    def _produce(self, epoch: int, step: int) -> Iterator[tuple[int, int, dict]]:
        while self.num_epochs is None or epoch < self.num_epochs:
            for s, batch in self._epoch_batches(epoch, step):
                yield epoch, s, (self.transform(batch) if self.transform else batch)
            epoch, step = epoch + 1, 0

    # --- iteration ------------------------------------------------------------------------------

    def _start(self) -> None:
        source = self._produce(self._epoch, self._step)
        if self.prefetch <= 0:
            self._sync = source
            return
        self._queue = q = queue.Queue(maxsize=self.prefetch)
        self._stop = stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in source:
                    if not put(item):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, raised there
                put(err)

        self._thread = threading.Thread(target=work, name="jaxlora-batches", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread (the position is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = self._sync = None

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._thread is None and self._sync is None:
            self._start()
        if self._sync is not None:
            item = next(self._sync, _END)
        else:
            item = self._queue.get()
        if item is _END:
            self.close()
            self._epoch, self._step = (self.num_epochs or 0), 0
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        epoch, step, batch = item
        self._epoch, self._step = epoch, step + 1
        if self.stream is None and self._step >= self.batches_in_epoch(epoch):
            self._epoch, self._step = epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """The position of the next batch: `{"epoch": e, "step": s}` (store it in a checkpoint)."""
        return {"epoch": int(self._epoch), "step": int(self._step)}

    def restore(self, state: Mapping[str, int]) -> None:
        """Resume at a position from `state()`: the next batch is the one that would have followed."""
        epoch, step = loader_position(state, "data")
        if epoch < 0 or step < 0:
            raise UserError(f"bad data loader state {dict(state)!r}; epoch and step must be >= 0")
        if self.stream is None and step > self.batches_in_epoch(epoch):
            raise UserError(
                f"data loader state step {step} is past the {self.batches_in_epoch(epoch)} batches of epoch "
                f"{epoch}; was the data, batch_size, seq_len or seed changed?"
            )
        self.close()
        self._epoch, self._step = epoch, step
        if self.stream is None and step == self.batches_in_epoch(epoch):
            self._epoch, self._step = epoch + 1, 0

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loader_position(state: Mapping[str, int], what: str) -> tuple[int, int]:
    """(epoch, step) of a loader's saved `state()`; a one-line UserError naming the `what` loader if it is
    not one."""
    try:
        return int(state["epoch"]), int(state["step"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"bad {what} loader state {dict(state)!r}; expected {{'epoch': int, 'step': int}}"
        ) from None
