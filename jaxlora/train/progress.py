"""A run's progress, as it is reported: metrics.jsonl and TensorBoard, `on_step` and the progress bar."""

import time

import numpy as np
import optax
from tqdm import tqdm

from jaxlora.config import Config
from jaxlora.train.metrics import MetricsLogger
from jaxlora.train.run_dir import RunDir


class Progress:
    """Turns the host metrics of the steps since the last report into logged scalars.

    Process 0 writes metrics.jsonl, TensorBoard events and the progress bar; every process calls
    `on_step(step, scalars)` and keeps the evaluation history.
    """

    def __init__(
        self, cfg: Config, run: RunDir, schedule: optax.Schedule, total_steps: int, step: int, on_step=None
    ):
        self.logger = MetricsLogger(run.path, tensorboard=cfg.logging.tensorboard, enabled=run.main)
        self.bar = None
        if cfg.logging.progress_bar and run.main:
            self.bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
        self.schedule = schedule
        self.on_step = on_step
        self.eval_history: list[tuple[int, float]] = []  # (step, eval loss)
        self.start(step)

    def start(self, step: int) -> None:
        """Time the steps after `step` from now (tokens per second, step time)."""
        self.last_time, self.last_step = time.perf_counter(), step

    def train(self, step: int, host: list[dict]) -> None:
        """Report steps `last_step + 1 .. step` from their metrics (host copies, one dict per step)."""
        now = time.perf_counter()
        tokens = sum(float(h["tokens"]) for h in host)
        scalars = {
            "train/loss": float(host[-1]["loss"]),
            "lr": float(self.schedule(step - 1)),
            "grad_norm": float(host[-1]["grad_norm"]),
            "tokens_per_sec": tokens / max(now - self.last_time, 1e-9),
            "step_time": (now - self.last_time) / len(host),
        }
        scalars["train/loss_avg"] = float(np.mean([float(h["loss"]) for h in host]))
        self.logger.log(step, scalars)
        if self.on_step is not None:
            self.on_step(step, scalars)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{scalars['train/loss']:.4f}",
                lr=f"{scalars['lr']:.2e}",
                tok_s=f"{scalars['tokens_per_sec']:.0f}",
            )
        self.last_time, self.last_step = now, step

    def eval(self, step: int, metrics: dict | None) -> None:
        """Log an evaluation's metrics (None: nothing was evaluated)."""
        if metrics is not None:
            self.logger.log(step, metrics)
            self.eval_history.append((step, metrics["eval/loss"]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()
