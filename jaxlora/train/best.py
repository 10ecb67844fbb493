"""The best evaluation so far and early stopping.

The tracker's state (`best_loss`, `best_step`, `bad_evals`) rides in every checkpoint's metadata, so a
resumed run knows the same best checkpoint and the same patience count as one never stopped.
"""

import dataclasses


@dataclasses.dataclass
class BestTracker:
    """Lowest eval loss so far; `bad_evals` counts the evaluations since it last improved."""

    patience: int | None = None  # train.early_stopping_patience
    min_delta: float = 0.0  # train.early_stopping_min_delta
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_step: int | None = None  # the step of the last evaluation seen

    def update(self, step: int, loss: float) -> bool:
        """Count one evaluation; True when it is the new best (lower by more than `min_delta`)."""
        if step == self.last_step:  # the same step evaluated again (the end of a run): nothing new
            return False
        self.last_step = step
        if self.best_loss is None or loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
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
            }
        }

    def load(self, meta: dict) -> None:
        best = meta.get("best") or {}
        self.best_loss, self.best_step = best.get("loss"), best.get("step")
        self.bad_evals, self.last_step = int(best.get("bad_evals", 0)), best.get("last_step")
