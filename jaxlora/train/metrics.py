"""Metrics sinks (`logging.trackers`): TensorBoard event files (tensorboardX), `metrics.jsonl` and W&B.

Sample generations go to TensorBoard as text, to `samples.jsonl` and to W&B as a table. W&B is the
optional `wandb` extra, imported only when listed; `WANDB_MODE=offline` keeps its run on disk.
"""

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    """Write scalars to TensorBoard (`output_dir/tensorboard/`) and `output_dir/metrics.jsonl`.

    Only the process that owns the run's outputs (process 0) should create one with `enabled=True`.
    """

    def __init__(
        self,
        output_dir: Path,
        tensorboard: bool = True,
        enabled: bool = True,
        trackers: tuple[str, ...] = ("tensorboard", "jsonl"),
        config: dict | None = None,
    ):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._samples = None
        self._wandb = None
        self.output_dir = Path(output_dir)
        if not enabled:
            return
        if "wandb" in trackers:
            self._wandb = _start_wandb(self.output_dir, config)
        if tensorboard and "tensorboard" in trackers:
            # Imported here: tensorboardX imports PyTorch whenever it is installed (about 200 MB of host
            # memory), which only the process writing the event file should pay.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "jsonl" in trackers:
            self._jsonl = open(Path(output_dir) / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One JSON line `{"step": s, ...}` and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))
        if self._tb is not None:
            now = time.time()
            for tag, value in clean.items():
                self._tb.add_scalar(tag, value, int(step), walltime=now)
            self._tb.flush()

    def samples(self, step: int, samples: list[dict]) -> None:
        """One line per sample in samples.jsonl, one TensorBoard text per sample, one W&B table."""
        if not self.enabled or not samples:
            return
        if self._samples is None:
            self._samples = open(self.output_dir / "samples.jsonl", "a")
        for i, s in enumerate(samples):
            self._samples.write(json.dumps({"step": int(step), "index": i, **s}) + "\n")
        self._samples.flush()
        if self._tb is not None:
            for i, s in enumerate(samples):
                self._tb.add_text(f"samples/{i}", _markdown(s), int(step))
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            table = wandb.Table(
                columns=["prompt", "completion"], data=[[s["prompt"], s["completion"]] for s in samples]
            )
            self._wandb.log({"samples": table}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._samples is not None:
            self._samples.close()
        if self._wandb is not None:
            self._wandb.finish()


def _markdown(sample: dict) -> str:
    """A sample as TensorBoard text (markdown): the prompt and the completion as code blocks."""
    return f"**prompt**\n\n```\n{sample['prompt']}\n```\n\n**completion**\n\n```\n{sample['completion']}\n```"


def _start_wandb(output_dir: Path, config: dict | None):
    """A W&B run writing under `output_dir/wandb` (project from WANDB_PROJECT, default jaxlora)."""
    try:
        import wandb
    except ImportError:
        from jaxlora.errors import UserError

        raise UserError(
            "logging.trackers lists wandb but wandb is not installed; pip install 'jaxlora[wandb]' "
            "or drop wandb from logging.trackers"
        ) from None
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "jaxlora"),
        dir=str(output_dir),
        config=config,
        name=output_dir.name,
        reinit="finish_previous",
    )
