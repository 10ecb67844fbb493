"""Metrics sinks: TensorBoard event files (tensorboardX) and `metrics.jsonl`."""

import json
import time
from pathlib import Path


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
            # Imported here: tensorboardX imports PyTorch whenever it is installed (about 200 MB of host
            # memory), which only the process writing the event file should pay.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self._jsonl = open(Path(output_dir) / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One JSON line `{"step": s, ...}` and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            now = time.time()
            for tag, value in clean.items():
                self._tb.add_scalar(tag, value, int(step), walltime=now)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
