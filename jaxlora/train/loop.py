"""`train(cfg)`: the whole run from a `Config`: load, data, LoRA, jitted steps, eval, checkpoints, export."""

import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import Config, save_config
from jaxlora.data import BatchLoader, build_datasets
from jaxlora.errors import UserError
from jaxlora.models import load_model, load_tokenizer
from jaxlora.train.checkpoint import Checkpointer, rng_from_array, rng_to_array
from jaxlora.train.metrics import MetricsLogger
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import BATCH_KEYS, StepSpec, make_eval_step, make_train_step

RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "adapter", "config.yaml")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the state of the last good step was kept."""


@dataclasses.dataclass
class TrainResult:
    """What a run ended with."""

    output_dir: Path
    step: int
    interrupted: int = 0  # the signal number that stopped the run, 0 if it finished
    eval_history: list = dataclasses.field(default_factory=list)


def prepare_output_dir(cfg: Config, resume_flag: bool = False) -> bool:
    """Create `output_dir`, decide whether to resume; never overwrite a run unless asked. Returns resume."""
    out = Path(cfg.output_dir)
    mode = "always" if resume_flag else cfg.checkpoint.resume
    ckpt = out / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    if mode == "always" and not has_ckpt:
        raise UserError(f"nothing to resume: {ckpt} has no checkpoint (checkpoint.resume is 'always')")
    if has_ckpt and mode != "never":
        return True
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"output_dir {out} is not empty and holds no run to resume; choose a new output_dir "
                "or set overwrite=true"
            )
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return False


class _StopSignals:
    """Turn SIGTERM/SIGINT into a flag checked between steps (then save and exit)."""

    def __init__(self):
        self.received = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _total_steps(cfg: Config, loader: BatchLoader) -> int:
    t = cfg.train
    steps = []
    if t.max_steps is not None:
        steps.append(t.max_steps)
    if t.num_epochs is not None:
        per_epoch = loader.num_batches_per_epoch
        if per_epoch is None:
            raise UserError(
                "train.num_epochs needs a dataset of known length; use train.max_steps with streaming"
            )
        steps.append(max(1, math.ceil(t.num_epochs * per_epoch / t.grad_accum_steps)))
    return min(steps)


def _quantizer(cfg: Config):
    if cfg.quant.weights == "none":
        return None
    from jaxlora.quant import make_quantizer

    return make_quantizer(cfg.quant.weights, cfg.quant.block_size, tuple(cfg.quant.skip))


def _evaluate(eval_fn, lora, base, scale, examples, cfg: Config) -> dict | None:
    if examples is None:
        return None
    loader = BatchLoader(
        examples,
        cfg.train.batch_size,
        cfg.data.seq_len,
        packing=cfg.data.packing,
        shuffle=False,
        num_epochs=1,
        prefetch=0,
        drop_last=False,
        seed=cfg.seed,
    )
    total, count = 0.0, 0.0
    for i, batch in enumerate(loader):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        s, n = eval_fn(lora, base, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}, scale)
        total, count = total + float(s), count + float(n)
    loader.close()
    if count == 0:
        return None
    loss = total / count
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0))}


def train(cfg: Config, *, resume: bool = False, on_step=None) -> TrainResult:
    """Run LoRA fine-tuning as configured; see `docs/configuration.md`. Returns a `TrainResult`.

    `on_step(step, metrics)` (optional) is called after each logging interval with host metrics.
    """
    from jaxlora.export import save_peft_adapter
    from jaxlora.lora import init_lora, lora_scale

    resuming = prepare_output_dir(cfg, resume)
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")

    model = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        compute_dtype=cfg.model.compute_dtype,
        attention=cfg.model.attention,
        remat=cfg.train.remat,
        revision=cfg.model.revision,
        allow_pickle=cfg.model.allow_pickle,
        quantizer=_quantizer(cfg),
        random_init_seed=cfg.seed if cfg.model.random_init else None,
    )
    mcfg = model.config
    if cfg.data.seq_len > mcfg.max_position_embeddings:
        raise UserError(
            f"data.seq_len {cfg.data.seq_len} is above the model's maximum of {mcfg.max_position_embeddings} "
            "positions (max_position_embeddings); lower data.seq_len"
        )
    tokenizer = load_tokenizer(cfg.model.tokenizer or model.path)
    train_ex, val_ex = build_datasets(cfg.data, tokenizer, cfg.seed)

    t = cfg.train
    loader = BatchLoader(
        train_ex,
        t.batch_size,
        cfg.data.seq_len,
        packing=cfg.data.packing,
        shuffle=cfg.data.shuffle,
        seed=cfg.seed,
        num_epochs=None,
    )
    total_steps = _total_steps(cfg, loader)
    optimizer, schedule = make_optimizer(t, total_steps)
    key = jax.random.key(cfg.seed)
    lora = init_lora(mcfg, cfg.lora, jax.random.fold_in(key, 1))
    scale = jnp.asarray(lora_scale(mcfg, cfg.lora))
    opt_state = optimizer.init(lora)
    base = model.params

    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep)
    step = 0
    if resuming:
        step = ckpt.latest_step()
        state, meta = ckpt.restore(step, {"lora": lora, "opt_state": opt_state, "rng": rng_to_array(key)})
        lora, opt_state, key = state["lora"], state["opt_state"], rng_from_array(state["rng"])
        loader.restore(meta["data"])

    spec = StepSpec(mcfg, cfg.lora.dropout, t.loss_chunk_size)
    step_fn = jax.jit(make_train_step(spec, optimizer), donate_argnums=(0, 1))
    eval_fn = jax.jit(make_eval_step(spec))
    logger = MetricsLogger(out, tensorboard=cfg.logging.tensorboard)
    result = TrainResult(out, step)

    def save(at: int):
        meta = {"step": at, "data": loader.state()}
        ckpt.save(at, {"lora": lora, "opt_state": opt_state, "rng": rng_to_array(key)}, meta)

    def run_eval(at: int):
        metrics = _evaluate(eval_fn, lora, base, scale, val_ex, cfg)
        if metrics is not None:
            logger.log(at, metrics)
            result.eval_history.append((at, metrics["eval/loss"]))
        return metrics

    bar = None
    if cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    eval_every = t.eval_every_steps
    if eval_every is not None and step == 0:
        run_eval(0)
    pending: list[dict] = []
    last_time, last_logged = time.perf_counter(), step
    with _StopSignals() as stop:
        while step < total_steps and not stop.received:
            micro = [next(loader) for _ in range(t.grad_accum_steps)]
            batch = {k: jnp.asarray(np.stack([m[k] for m in micro])) for k in BATCH_KEYS}
            lora, opt_state, m = step_fn(lora, opt_state, base, batch, jax.random.fold_in(key, step), scale)
            pending.append(m)
            step += 1
            at_log = step % cfg.logging.every_steps == 0 or step == total_steps
            at_ckpt = cfg.checkpoint.every_steps is not None and step % cfg.checkpoint.every_steps == 0
            if at_log or at_ckpt or stop.received:
                host = jax.device_get(pending)
                bad = [last_logged + i + 1 for i, h in enumerate(host) if h["nonfinite"]]
                if bad:
                    good = ckpt.latest_step()
                    good = "none" if good is None else f"step {good} in {out / 'checkpoints'}"
                    raise TrainingDiverged(
                        f"loss or gradient became NaN/Inf at step {bad[0]}; stopped; "
                        f"last good checkpoint: {good}"
                    )
                now = time.perf_counter()
                tokens = sum(float(h["tokens"]) for h in host)
                scalars = {
                    "train/loss": float(host[-1]["loss"]),
                    "lr": float(schedule(step - 1)),
                    "grad_norm": float(host[-1]["grad_norm"]),
                    "tokens_per_sec": tokens / max(now - last_time, 1e-9),
                    "step_time": (now - last_time) / len(host),
                }
                scalars["train/loss_avg"] = float(np.mean([float(h["loss"]) for h in host]))
                logger.log(step, scalars)
                if on_step is not None:
                    on_step(step, scalars)
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(
                        loss=f"{scalars['train/loss']:.4f}",
                        lr=f"{scalars['lr']:.2e}",
                        tok_s=f"{scalars['tokens_per_sec']:.0f}",
                    )
                pending, last_time, last_logged = [], now, step
            if eval_every is not None and step % eval_every == 0 and step < total_steps:
                run_eval(step)
            if at_ckpt:
                save(step)
        result.interrupted = stop.received
    save(step)
    if not result.interrupted:
        if eval_every is not None:
            run_eval(step)
        save_peft_adapter(out / "adapter", lora, cfg.lora, mcfg, model.name_or_path, overwrite=True)
    if bar is not None:
        bar.close()
    loader.close()
    logger.close()
    ckpt.close()
    result.step = step
    (out / "run_state.json").write_text(json.dumps({"step": step, "finished": not result.interrupted}))
    return result
