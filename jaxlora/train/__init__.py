"""Training: the pure jitted step, AdamW and schedules, chunked loss, orbax checkpoints, metrics, and
`train(cfg)` (`loop`), a recipe over the run folder (`run_dir`), the training state (`state`) and the
progress report (`progress`)."""

from jaxlora.train.loop import TrainingDiverged, TrainResult, train
from jaxlora.train.step import StepSpec, make_eval_step, make_train_step

__all__ = ["StepSpec", "TrainResult", "TrainingDiverged", "make_eval_step", "make_train_step", "train"]
