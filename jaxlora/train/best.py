"""The best evaluation so far and early stopping: two questions, kept apart.

The best step is the one with the lowest eval loss (`checkpoint.keep_best`, `checkpoint.export: best`).
Early stopping counts the evaluations since the last progress, an eval loss more than
`train.early_stopping_min_delta` below the loss of the previous progress (Keras' `min_delta`), so slow
steady gains add up to progress while a run of tiny ones does not hold the run open. `min_delta` never
decides which step is the best.

The tracker's state rides in every checkpoint's metadata, so a resumed run knows the same best
checkpoint and the same patience count as one never stopped.
"""

import dataclasses


@dataclasses.dataclass
class BestTracker:
    """Lowest eval loss so far (`best_loss` at `best_step`); `bad_evals` counts the evaluations since the
    last progress (a loss below `progress_loss` by more than `min_delta`)."""

    patience: int | None = None  # train.early_stopping_patience
    min_delta: float = 0.0  # train.early_stopping_min_delta
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_step: int | None = None  # the step of the last evaluation seen
    progress_loss: float | None = None  # the eval loss of the last progress

    def update(self, step: int, loss: float) -> bool:
        """Count one evaluation; True when it is the new best (the lowest eval loss so far)."""
        if step == self.last_step:  # the same step evaluated again (the end of a run): nothing new
            return False
        self.last_step = step
        if self.progress_loss is None or loss < self.progress_loss - self.min_delta:
            self.progress_loss, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        """What a checkpoint's metadata holds (`{"best": {...}}`)."""
        return {
            "best": {
                "loss": self.best_loss,
                "step": self.best_step,
                "bad_evals": self.bad_evals,
                "last_step": self.last_step,
                "progress_loss": self.progress_loss,
            }
        }

    def load(self, meta: dict) -> None:
        """The state of `state()`; a checkpoint written before `progress_loss` was kept apart has its
        progress at the best loss (as it was then)."""
        best = meta.get("best") or {}
        self.best_loss, self.best_step = best.get("loss"), best.get("step")
        self.bad_evals, self.last_step = int(best.get("bad_evals", 0)), best.get("last_step")
        self.progress_loss = best.get("progress_loss", self.best_loss)
