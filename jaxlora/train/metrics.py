"""Metrics sinks: TensorBoard event files, `metrics.jsonl`, and a tqdm progress bar."""

import json
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsLogger:
    """Write scalars to TensorBoard (`output_dir/tensorboard/`) and `output_dir/metrics.jsonl`.

    Only the process that owns the run's outputs (process 0) should create one with `enabled=True`.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        if tensorboard:
            self._tb = EventFileWriter(str(Path(output_dir) / "tensorboard"))
        self._jsonl = open(Path(output_dir) / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One JSON line `{"step": s, ...}` and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            values = [Summary.Value(tag=k, simple_value=v) for k, v in clean.items()]
            self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
