"""What each evaluation feeds besides the metrics: sample generations, the best checkpoint and early
stopping (`checkpoint.keep_best`, `train.early_stopping_*`, `train.eval_samples`)."""

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxlora.lora.tokens import with_embeddings
from jaxlora.train.best import BestTracker
from jaxlora.train.checkpoint import Checkpointer
from jaxlora.train.run_dir import BEST_DIR, RunDir
from jaxlora.train.samples import generate_samples, sample_prompts
from jaxlora.train.state import TrainState, save_state


@dataclasses.dataclass
class Watch:
    """The best-so-far tracker and the sample prompts of a run."""

    best: BestTracker
    best_dir: Path
    keep_best: bool
    prompts: list  # token ids of the sample prompts (empty: no samples)
    tokenizer: Any
    max_new_tokens: int

    def after_eval(
        self, state: TrainState, metrics: dict, steps, ckpt: Checkpointer, loader, progress
    ) -> bool:
        """Generate the samples, keep a new best checkpoint; True: stop early. `steps` gives the base
        (`steps.base.params`, `.config`) and the LoRA scale."""
        if self.prompts:
            params, lora = with_embeddings(steps.base.params, state.adapter.tree())
            samples = generate_samples(
                params,
                steps.base.config,
                lora,
                steps.scale,
                self.prompts,
                self.tokenizer,
                self.max_new_tokens,
            )
            progress.samples(state.step, samples)
        if "eval/loss" not in metrics:
            return False
        improved = self.best.update(state.step, metrics["eval/loss"])
        ckpt.extra_meta = self.best.state()  # every later checkpoint carries it
        if improved and self.keep_best:
            save_state(ckpt, state, loader)  # a collective; then process 0 links it
            ckpt.keep_as_best(state.step, self.best_dir)
        if self.best.should_stop:
            progress.say(
                f"early stopping at step {state.step}: eval loss has not improved for {self.best.bad_evals} "
                f"evaluations (best {self.best.best_loss:.4f} at step {self.best.best_step})"
            )
        return self.best.should_stop


def open_watch(cfg, run: RunDir, ckpt: Checkpointer, tokenizer, val) -> Watch:
    """The tracker (from the resumed checkpoint's metadata) and the sample prompts. Samples need the
    whole model on this process, so multi-process runs skip them."""
    best = BestTracker(cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta)
    best_dir = run.path / BEST_DIR
    if run.resuming and ckpt.latest_step() is not None:
        best.load(ckpt.read_meta(ckpt.latest_step()))
        kept = best_dir / str(best.best_step)
        if cfg.checkpoint.keep_best and best.best_step == ckpt.latest_step() and not kept.is_dir():
            ckpt.keep_as_best(best.best_step, best_dir)  # killed between saving and keeping it
    ckpt.extra_meta = best.state()
    prompts = []
    if cfg.train.eval_every_steps is not None and jax.process_count() == 1:
        prompts = sample_prompts(cfg, tokenizer, val)
    return Watch(
        best, best_dir, cfg.checkpoint.keep_best, prompts, tokenizer, cfg.train.sample_max_new_tokens
    )


def curves(path: Path) -> list[str]:
    """The run's metric files and folders that exist."""
    names = ["metrics.jsonl", "tensorboard", "samples.jsonl", "wandb"]
    return [str(path / n) for n in names if (path / n).exists()]
