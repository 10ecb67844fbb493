"""A run's progress, as it is reported: the trackers (metrics.jsonl, TensorBoard, W&B), `on_step`, the
progress bar and the console lines (summaries, evaluations; `logging.level` warning silences them).

On a terminal the steps show as a progress bar (`logging.progress_bar`). Without one (output to a file,
under nohup or a scheduler), or without the bar, each logging step prints one plain line instead, as HF
Trainer and Axolotl logs do: no carriage returns in the file.
"""

import sys
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
        self.logger = MetricsLogger(
            run.path,
            tensorboard=cfg.logging.tensorboard,
            enabled=run.main,
            trackers=tuple(cfg.logging.trackers),
            config=cfg.model_dump(mode="json"),
        )
        self.verbose = run.main and cfg.logging.level == "info"
        self.total_steps = total_steps
        self.compiled_once = False
        self.bar = None
        if cfg.logging.progress_bar and run.main and on_terminal():
            self.bar = tqdm(total=total_steps, initial=step, desc="compiling", dynamic_ncols=True)
        self.began = time.perf_counter()
        self.schedule = schedule
        self.on_step = on_step
        self.eval_history: list[tuple[int, float]] = []  # (step, eval loss)
        self.start(step)

    def say(self, text: str) -> None:
        """A console line (process 0, `logging.level` info), printed above the progress bar."""
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def compiled(self) -> None:
        """The first step was compiled: the bar counts training steps from now on."""
        if not self.compiled_once:  # tokens/s and step time from here: not the compilation
            self.compiled_once = True
            self.last_time = time.perf_counter()
            if self.bar is not None:
                self.bar.set_description_str("train")
            else:
                took = _duration(self.last_time - self.began)
                self.say(f"step {self.last_step + 1} compiled and done, {took} after the start")

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
        for key, value in host[-1].items():  # the objective's own metrics (DPO rewards, MoE aux loss, ...)
            if key not in ("loss", "grad_norm", "tokens", "nonfinite"):
                scalars[f"train/{key}"] = float(value)
        self.logger.log(step, scalars)
        if self.on_step is not None:
            self.on_step(step, scalars)
        shown = _shown(scalars, self.total_steps - step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k.replace("/", "_"): v for k, v in shown.items()})  # tok_s=...
        else:  # a log file: one plain line per logging step
            fields = ", ".join(f"{k} {v}" for k, v in shown.items() if k != "eta")
            elapsed = _duration(now - self.began)
            self.say(f"step {step}/{self.total_steps}: {fields}, elapsed {elapsed}, eta {shown['eta']}")
        self.last_time, self.last_step = now, step

    def eval(self, step: int, metrics: dict | None) -> None:
        """Log an evaluation's metrics (None: nothing was evaluated)."""
        if metrics is not None:
            self.logger.log(step, metrics)
            if "eval/loss" in metrics:
                self.eval_history.append((step, metrics["eval/loss"]))
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items())
            self.say(f"eval step {step}: {shown}")

    def samples(self, step: int, samples: list[dict]) -> None:
        """Log the sample generations of an evaluation (one console line each, cut to 100 characters)."""
        self.logger.samples(step, samples)
        for i, s in enumerate(samples):
            self.say(f"sample {i} step {step}: {s['completion'][:100]!r}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


def on_terminal() -> bool:
    """True when stdout and stderr both go to a terminal (the progress bar can redraw its line)."""
    return all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))


def _shown(scalars: dict, steps_left: int) -> dict[str, str]:
    """The figures a bar's postfix or a log line shows: loss, lr, tokens/s, DPO/ORPO's accuracies and
    margins, and the time left."""
    shown = {
        "loss": f"{scalars['train/loss']:.4f}",
        "lr": f"{scalars['lr']:.2e}",
        "tok/s": f"{scalars['tokens_per_sec']:,.0f}",
    }
    for k in ("accuracies", "margins"):
        if f"train/rewards/{k}" in scalars:
            shown[k] = f"{scalars[f'train/rewards/{k}']:.3f}"
    shown["eta"] = _duration(scalars["step_time"] * steps_left)
    return shown


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
