"""`train(cfg)`: LoRA fine-tuning from a `Config`, as a recipe of named steps:

    model = open_model(cfg)                   the model's folder and config.json, read once (`setup`)
    check_peft_export(model.config, cfg.lora) what the adapter's export would refuse, refused now
    plan = choose_plan(cfg, model)            devices and hosts, checked against the model's config.json
    run = open_run(cfg, resume, plan)         output_dir: claim it, resume or start clean (`run_dir`); a
                                              finished run with nothing left to do returns here
    tokenizer = load_checked_tokenizer(...)   the tokenizer, checked against the model (`checks`)
    base = load_base(cfg, plan, vocab, model) the frozen base weights (grown for added tokens), on the devices
    data = build_data(cfg, tokenizer, plan)   training batches, validation examples, the number of steps
                                              (GRPO: prompts, and the feed that samples each step's batch)
    run.commit(cfg, plan, data.total_steps)   setup succeeded: config.yaml written, an old run cleaned
    state = build_state(...)                  LoRA and optimizer state, fresh or from a checkpoint (`state`)
    steps = compile_steps(...)                the train and eval steps, compiled for the plan
    state, stopped_by = run_loop(...)         steps, logging, evaluation, checkpoints, stop signals
    finish(...)                               the last checkpoint and evaluation, the PEFT adapter (also
                                              after SIGINT/SIGTERM: the checkpoint saved then, so marked)

None of them knows which parallel strategy runs: the `Plan` (`jaxlora.parallel`, docs/multi-gpu.md) places
the arrays, compiles the steps and assembles each batch. With several processes every process runs this
same function on its own slice of each batch; only process 0 writes config.yaml, metrics.jsonl,
TensorBoard events, run_state.json and the adapter, while checkpoints are written by all of them together.
"""

import dataclasses
import logging
import math
import signal
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

from jaxlora.config import Config
from jaxlora.lora import Adapter, lora_scale
from jaxlora.lora.tokens import RESIZED, resized_entry
from jaxlora.models.saving import DiskFull
from jaxlora.parallel import Plan
from jaxlora.peft import save_peft_adapter
from jaxlora.peft.adapter import check_peft_export
from jaxlora.train.checkpoint import Checkpointer, restore_lora, rng_from_array
from jaxlora.train.checks import check_schedule, load_checked_tokenizer
from jaxlora.train.memory_plan import preflight, run_step_memory
from jaxlora.train.optim import make_optimizer
from jaxlora.train.progress import Progress
from jaxlora.train.registry import objective_for
from jaxlora.train.rewards import RewardError
from jaxlora.train.run_dir import BEST_DIR, RunDir, open_run, write_run_state
from jaxlora.train.setup import Base, Data, build_data, choose_plan, load_base, open_model
from jaxlora.train.state import (
    TrainState,
    build_state,
    initial_adapter,
    residual_base,
    save_state,
)
from jaxlora.train.step import BATCH_KEYS, make_eval_step, make_train_step
from jaxlora.train.stop import SignalRecord, StopSignals
from jaxlora.train.summary import end_summary, start_summary
from jaxlora.train.vocab import resolve_token_texts, save_run_vocab
from jaxlora.train.watch import Watch, curves, open_watch

log = logging.getLogger("jaxlora.train")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the state of the last good step was kept."""


@dataclasses.dataclass
class TrainResult:
    """What a run ended with."""

    output_dir: Path
    step: int
    interrupted: int = 0  # the signal number that stopped the run, 0 if it finished
    eval_history: list = dataclasses.field(default_factory=list)
    finished_before: bool = False  # the run had already finished at `step`: nothing was done


def train(
    cfg: Config, *, resume: bool = False, on_step=None, signals: SignalRecord | None = None
) -> TrainResult:
    """Run LoRA fine-tuning as configured; see `docs/configuration.md` and `docs/multi-gpu.md`.

    Returns a `TrainResult` (`finished_before`: the run in `output_dir` had already finished and this
    config leaves it nothing to do; nothing was read or written). `on_step(step, metrics)` (optional) is
    called after each logging interval with host metrics. SIGTERM/SIGINT stop the run after a checkpoint
    (exported to adapter/, marked interrupted); `signals` (optional) is where the caller's own handlers
    record a signal (`jaxlora.cli.signals.RECEIVED`): one recorded before the loop
    stops it at once (`jaxlora.train.stop`). Multi-host: every process calls `train` with the same config.
    """
    model = open_model(cfg)
    check_peft_export(model.config, cfg.lora)  # what the adapter's export would refuse at the end
    plan = choose_plan(cfg, model)
    if cfg.train.preflight:  # refuse a plan that does not fit, before any weights are read
        preflight(cfg, model, plan)
    run = open_run(cfg, resume, plan)  # decides and checks; writes nothing yet
    if run.finished is not None:  # a finished run with nothing left to do: read nothing, write nothing
        run.release()
        return TrainResult(run.path, run.finished, finished_before=True)
    try:
        tokenizer = load_checked_tokenizer(cfg, model)
        base = load_base(cfg, plan, len(tokenizer), model)
        resolved = resolve_token_texts(cfg, tokenizer, base.vocab_before)  # token texts -> ids
        data = build_data(cfg, tokenizer, plan)
        check_schedule(cfg.train, data.total_steps)
    except BaseException:
        run.abandon()  # a failed setup leaves the folder as it found it
        raise
    run.commit(cfg, plan, data.total_steps)  # config.yaml keeps the texts as written
    cfg = resolved
    if run.main and cfg.data.add_special_tokens:
        save_run_vocab(run.path, tokenizer, base.rows, base.vocab_before)
    try:
        optimizer, schedule = make_optimizer(cfg.train, data.total_steps)
        ckpt = Checkpointer(run.path / "checkpoints", cfg.checkpoint.keep)
        state = build_state(cfg, base.config, optimizer, plan, ckpt, data.loader, run.resuming, base.params)
        if data.feed is not None:  # GRPO: checkpoints carry the batch in progress, and give it back
            data.feed.attach(ckpt, state.step)
        initial = initial_adapter(cfg, base.config, base.params)  # PiSSA/OLoRA: step 0's adapter, else None
        if initial is not None:  # train on the residual base, as PEFT does
            base = base._replace(
                params=plan.place_base(residual_base(base.params, initial, cfg, base.config))
            )
        steps = compile_steps(cfg, base, optimizer, state, plan)
        progress = Progress(cfg, run, schedule, data.total_steps, state.step, on_step)
        trainable = state.adapter.trainable
        memory = None if data.feed else run_step_memory(cfg, steps, state)  # compiles the train step
        progress.say(start_summary(cfg, plan, base, data, trainable, data.total_steps, state.step, memory))
        watch = open_watch(cfg, run, ckpt, tokenizer, None if data.feed else data.val)
        state, stopped_by = run_loop(cfg, plan, state, steps, data, ckpt, progress, watch, signals)
        return finish(
            cfg, run, plan, state, steps, data, ckpt, progress, stopped_by, initial, watch, tokenizer
        )
    finally:
        run.release()


# ----------------------------------------------------------------------------------------------------
# The compiled steps


@dataclasses.dataclass(frozen=True)
class Steps:
    """The train and eval steps compiled for the plan, bound to what they take that never changes."""

    plan: Plan
    base: Base
    train_fn: Callable  # (adapter, opt_state, base, batch, rng, scale, *extra) -> (adapter, opt, metrics)
    eval_fn: Callable  # (adapter, base, batch, scale, *extra) -> the objective's eval metrics
    scale: jax.Array  # [L] alpha / r on adapted layers, else 0; replicated
    key: jax.Array  # the run's key, replicated
    fold_in: Callable  # (key, step) -> the step's key, replicated
    keys: tuple[str, ...] = BATCH_KEYS  # the batch arrays the steps read (`PAIR_KEYS` for DPO/ORPO)
    extra: tuple = ()  # frozen trees the steps take last: (DPO's reference adapter,) or none

    def train(self, state: TrainState, micro: list[dict]) -> tuple[TrainState, dict]:
        """One optimizer step over `micro`, this process's rows of `grad_accum_steps` micro-batches."""
        batch = self.plan.put_batch({k: np.stack([m[k] for m in micro]) for k in self.keys})
        rng = self.fold_in(self.key, state.step)
        adapter, opt_state, metrics = self.train_fn(
            state.adapter, state.opt_state, self.base.params, batch, rng, self.scale, *self.extra
        )
        return dataclasses.replace(state, adapter=adapter, opt_state=opt_state, step=state.step + 1), metrics

    def eval(self, adapter: Adapter, batch: dict):
        """(loss sum, token count), or a dict of sums and "count" (DPO/ORPO), over one validation batch
        (this process's rows of it)."""
        batch = self.plan.put_eval_batch({k: batch[k] for k in self.keys})
        return self.eval_fn(adapter, self.base.params, batch, self.scale, *self.extra)


def compile_steps(
    cfg: Config, base: Base, optimizer: optax.GradientTransformation, state: TrainState, plan: Plan
) -> Steps:
    """The one train step and the eval step (`jaxlora.train.step`) compiled for the plan and the shardings
    of `base` and `state`. DPO against its initial adapter passes `state.reference` to both steps as
    their last argument (`ref_lora`), as the plan's `extra`."""
    objective = objective_for(cfg, base.config)
    train_step = make_train_step(objective, optimizer, plan.collective)
    eval_step, keys = make_eval_step(objective, plan.collective), objective.batch_keys
    extra = () if state.reference is None else (state.reference,)  # DPO's frozen initial adapter
    train_fn, eval_fn = plan.compile_steps(
        train_step, eval_step, base.params, state.adapter, state.opt_state, extra
    )
    scale = plan.replicate(np.asarray(lora_scale(base.config, cfg.lora), np.float32))
    key = rng_from_array(plan.replicate(state.rng))
    fold_in = jax.jit(jax.random.fold_in, out_shardings=plan.replicated)
    return Steps(plan, base, train_fn, eval_fn, scale, key, fold_in, keys, extra)


def evaluate(cfg: Config, steps: Steps, adapter: Adapter, data: Data) -> dict | None:
    """The validation metrics: `eval/<name>` = the sum of `name` over the batches / the sum of their
    weights; None without validation data.

    An eval step returns `(loss_sum, token_count)` (then also `eval/perplexity` = exp(eval/loss)) or a
    dict of per-batch sums with their weight under "count" (`{"loss": ..., "rewards/margins": ...,
    "count": ...}`, a preference eval step)."""
    if data.val is None:
        return None
    outs = jax.device_get([steps.eval(adapter, batch) for batch in data.eval_batches(cfg)])
    sums = [o if isinstance(o, dict) else {"loss": o[0], "count": o[1]} for o in outs]
    count = sum(float(s["count"]) for s in sums)
    if count == 0:
        return None
    metrics = {f"eval/{k}": sum(float(s[k]) for s in sums) / count for k in sums[0] if k != "count"}
    if not isinstance(outs[0], dict):  # a token loss
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 80.0))
    return metrics


# ----------------------------------------------------------------------------------------------------
# The loop and the end of a run


def run_loop(
    cfg: Config,
    plan: Plan,
    state: TrainState,
    steps: Steps,
    data: Data,
    ckpt: Checkpointer,
    progress: Progress,
    watch: Watch | None = None,
    signals: SignalRecord | None = None,
) -> tuple[TrainState, int]:
    """Train to `data.total_steps`, until SIGTERM/SIGINT or until early stopping; report every
    `logging.every_steps` (raising `TrainingDiverged` at a NaN/Inf step), evaluate every
    `train.eval_every_steps` (samples, the best checkpoint: `watch`) and checkpoint every
    `checkpoint.every_steps`. Returns the state and the signal that stopped the run (0: none did; one in
    `signals` before the loop stops it at once)."""
    eval_every, ckpt_every = cfg.train.eval_every_steps, cfg.checkpoint.every_steps
    pending: list[dict] = []  # the metrics (on the devices) of the steps since the last report
    early = False  # early stopping: the eval loss stopped improving
    with StopSignals(signals) as stop:
        if eval_every is not None and state.step == 0:
            early = _eval_and_watch(cfg, steps, state, data, ckpt, progress, watch)
        progress.start(state.step)
        stopping = plan.agree_to_stop(stop.received, True)
        while state.step < data.total_steps and not stopping and not early:
            try:
                micro, fed = data.next_micro(cfg, state, steps)  # GRPO: rollouts, rewards (`grpo_feed`)
            except RewardError:  # a reward function failed: keep the run's state, then stop
                save_state(ckpt, state, data.loader)
                raise
            state, metrics = steps.train(state, micro)
            metrics = {**metrics, **fed}
            progress.compiled()
            pending.append(metrics)
            step = state.step
            at_log = step % cfg.logging.every_steps == 0 or step == data.total_steps
            at_ckpt = ckpt_every is not None and step % ckpt_every == 0
            stopping = plan.agree_to_stop(stop.received, at_log or at_ckpt)
            if at_log or at_ckpt or stopping:
                host = jax.device_get(pending)
                _check_finite(host, progress.last_step + 1, ckpt, Path(cfg.output_dir))
                progress.train(step, host)
                pending = []
            if eval_every is not None and step % eval_every == 0 and step < data.total_steps:
                early = _eval_and_watch(cfg, steps, state, data, ckpt, progress, watch)
                if early and pending:  # the steps since the last report, before the run ends
                    host = jax.device_get(pending)
                    _check_finite(host, progress.last_step + 1, ckpt, Path(cfg.output_dir))
                    progress.train(step, host)
                    pending = []
            if at_ckpt:
                save_state(ckpt, state, data.loader)
        return state, plan.agree(stop.received)


def _check_finite(host: list[dict], first: int, ckpt: Checkpointer, out: Path) -> None:
    """Raise `TrainingDiverged` if any of the steps `first, first + 1, ...` (host metrics) was not finite."""
    bad = [first + i for i, h in enumerate(host) if h["nonfinite"]]
    if bad:
        good = ckpt.latest_step()
        good = "none" if good is None else f"step {good} in {out / 'checkpoints'}"
        raise TrainingDiverged(
            f"loss or gradient became NaN/Inf at step {bad[0]}; stopped; last good checkpoint: {good}"
        )


def finish(
    cfg: Config,
    run: RunDir,
    plan: Plan,
    state: TrainState,
    steps: Steps,
    data: Data,
    ckpt: Checkpointer,
    progress: Progress,
    stopped_by: int,
    initial: dict | None = None,
    watch: Watch | None = None,
    tokenizer=None,
) -> TrainResult:
    """Unless a signal stopped the run, evaluate (once per step); save the last checkpoint; export the
    PEFT adapter (`export_adapter`): from the last step or, with `checkpoint.export` best and no signal,
    from the best checkpoint; after a signal from the checkpoint just saved, marked as interrupted. Close
    the run's files and write run_state.json."""
    evaluated = watch is not None and watch.best.last_step == state.step
    if not stopped_by and cfg.train.eval_every_steps is not None and not evaluated:
        _eval_and_watch(cfg, steps, state, data, ckpt, progress, watch)
    save_state(ckpt, state, data.loader)
    best_step = watch.best.best_step if watch is not None else None
    from_best = cfg.checkpoint.export == "best" and best_step is not None and best_step != state.step
    from_best = from_best and not stopped_by
    adapter_from = f"best step, {best_step}" if from_best else f"last step, {state.step}"
    if stopped_by:
        adapter_from = f"checkpoint saved at the stop, step {state.step}"
    about = {"step": str(best_step if from_best else state.step), "from": adapter_from.split(",")[0]}
    about["state"] = f"finished at step {state.step}"
    if stopped_by:
        about["state"] = f"{stop_words(stopped_by)} at step {state.step}"
        about["note"] = "the run is not finished: this is its checkpoint at the stop (rerun it to resume)"
    export_adapter(cfg, run, plan, state, steps, initial, tokenizer, from_best, about)
    best = watch.best if watch is not None and cfg.checkpoint.keep_best else None
    progress.say(end_summary(run.path, adapter_from, best, curves(run.path)))
    progress.close()
    data.loader.close()
    ckpt.close()
    write_run_state(run, state.step, finished=not stopped_by)
    plan.barrier("jaxlora-run-done")
    return TrainResult(run.path, state.step, stopped_by, progress.eval_history)


def stop_words(signum: int) -> str:
    """How a stop by `signum` is said, here and by the command lines: "interrupted by SIGINT"."""
    return f"interrupted by {signal.Signals(signum).name}"


def export_adapter(
    cfg: Config,
    run: RunDir,
    plan: Plan,
    state: TrainState,
    steps: Steps,
    initial: dict | None,
    tokenizer,
    from_best: bool,
    about: dict[str, str],
) -> None:
    """Write `adapter/` from the last step or the best checkpoint (a PiSSA/OLoRA one converted against
    `initial`, so it applies to the original base; with the tokenizer, and a grown vocabulary's embedding
    layers as PEFT saves them); `about` goes into its metadata and README.md. A full disk: `DiskFull`
    saying that the last checkpoint is intact."""
    lora = plan.to_host(state.adapter.tree())  # a collective when LoRA is sharded over hosts
    grown = None  # a grown vocabulary: its embedding layers go into the adapter file, as PEFT's
    if steps.base.rows is not None:
        layers = {k: v for k, v in steps.base.params.items() if k in ("embed", "lm_head")}
        grown = resized_entry(plan.to_host(layers), steps.base.config)
    if not run.main:
        return
    if from_best:
        lora, _ = restore_lora(run.path / BEST_DIR)
    if grown is not None:
        lora = {**lora, RESIZED: grown}
    base, out = steps.base, run.path / "adapter"
    try:
        save_peft_adapter(
            out, lora, cfg.lora, base.config, base.name, overwrite=True, initial_lora=initial, about=about
        )
    except DiskFull as err:
        raise err.said(
            f"writing the adapter of step {about['step']}",
            f"; checkpoint step {state.step} in {run.path / 'checkpoints'} is intact: free some space, then "
            f"export it with `jaxlora export --run {run.path} --format peft --out DIR`",
        ) from None
    if tokenizer is not None:  # beside the adapter, as transformers' Trainer saves it
        tokenizer.save_pretrained(str(out))


def _eval_and_watch(
    cfg: Config, steps: Steps, state: TrainState, data: Data, ckpt: Checkpointer, progress: Progress, watch
) -> bool:
    """Evaluate and log, then samples and the best checkpoint (`Watch.after_eval`). True: stop early."""
    if data.feed is not None:  # GRPO: the mean reward of completions of the validation prompts
        metrics, samples = data.feed.evaluate(state, steps)
        progress.eval(state.step, metrics)
        progress.samples(state.step, samples)
        return False
    metrics = evaluate(cfg, steps, state.adapter, data)
    progress.eval(state.step, metrics)
    if watch is None or metrics is None:
        return False
    return watch.after_eval(state, metrics, steps, ckpt, data.loader, progress)
