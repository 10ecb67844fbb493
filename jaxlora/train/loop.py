"""`train(cfg)`: the whole run from a `Config`: load, data, LoRA, jitted steps, eval, checkpoints, export.

Devices and hosts follow `cfg.parallel` (see `jaxlora.parallel` and docs/multi-gpu.md): the plan places the
base, LoRA and optimizer state, and compiles the one train step. With several processes every process runs
this same function on its own slice of each batch; only process 0 writes config.yaml, metrics.jsonl,
TensorBoard events, run_state.json and the adapter, while checkpoints are written by all of them together.
"""

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np

from jaxlora.config import Config, save_config
from jaxlora.data import BatchLoader, build_datasets
from jaxlora.errors import UserError
from jaxlora.models import load_model, load_tokenizer
from jaxlora.parallel import Plan, init_distributed, make_plan
from jaxlora.train.checkpoint import Checkpointer, rng_from_array, rng_to_array
from jaxlora.train.metrics import MetricsLogger
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import BATCH_KEYS, StepSpec, make_eval_step, make_train_step

log = logging.getLogger("jaxlora.train")
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


def prepare_output_dir(cfg: Config, resume_flag: bool = False, *, clean: bool = True) -> bool:
    """Create `output_dir`, decide whether to resume; never overwrite a run unless asked. Returns resume.

    With `clean=False` it only decides (and raises), touching nothing: what processes other than 0 do.
    """
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
        if not clean:
            return False
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if clean:
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


def _evaluate(eval_fn, lora, base, scale, examples, cfg: Config, plan: Plan) -> dict | None:
    if examples is None:
        return None
    index, count = plan.loader_slice()
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
        process_index=index,
        process_count=count,
    )
    sums = []
    for i, batch in enumerate(loader):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        sums.append(eval_fn(lora, base, plan.put_eval_batch({k: batch[k] for k in BATCH_KEYS}), scale))
    loader.close()
    total = sum(float(s) for s, _ in jax.device_get(sums))
    count = sum(float(n) for _, n in jax.device_get(sums))
    if count == 0:
        return None
    loss = total / count
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0))}


def _model_config(cfg: Config):
    """The model's `DecoderConfig` from config.json alone (to check the mesh before loading weights)."""
    from jaxlora.models.config import config_from_hf, read_hf_config
    from jaxlora.models.loading import resolve_model_path

    return config_from_hf(read_hf_config(resolve_model_path(cfg.model.path, cfg.model.revision)))


def train(cfg: Config, *, resume: bool = False, on_step=None) -> TrainResult:
    """Run LoRA fine-tuning as configured; see `docs/configuration.md` and `docs/multi-gpu.md`.

    Returns a `TrainResult`. `on_step(step, metrics)` (optional) is called after each logging interval with
    host metrics. Multi-host: every process calls `train` with the same config.
    """
    from jaxlora.export import save_peft_adapter
    from jaxlora.lora import init_lora, lora_scale

    init_distributed(cfg.parallel.distributed)
    t = cfg.train
    arch = _model_config(cfg)  # config.json only: check before loading any weights
    if cfg.data.seq_len > arch.max_position_embeddings:
        raise UserError(
            f"data.seq_len {cfg.data.seq_len} is above the model's maximum of {arch.max_position_embeddings} "
            "positions (max_position_embeddings); lower data.seq_len"
        )
    plan = make_plan(cfg.parallel, t.batch_size, arch.num_kv_heads)
    log.info("parallel: %s", plan.describe())
    main = plan.is_main
    resuming = prepare_output_dir(cfg, resume, clean=False)  # every process decides before anyone cleans
    plan.barrier("jaxlora-output-dir-read")
    if main:
        prepare_output_dir(cfg, resume)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    plan.barrier("jaxlora-output-dir-ready")
    out = Path(cfg.output_dir)

    with plan.host_loading():
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
    mcfg, model_path, model_name = model.config, model.path, model.name_or_path
    base_s = plan.param_shardings(model.params)
    base = plan.place(model.params, base_s)
    del model  # the host (or first-device) copy of the weights
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    train_ex, val_ex = build_datasets(cfg.data, tokenizer, cfg.seed)

    index, count = plan.loader_slice()
    loader = BatchLoader(
        train_ex,
        t.batch_size,
        cfg.data.seq_len,
        packing=cfg.data.packing,
        shuffle=cfg.data.shuffle,
        seed=cfg.seed,
        num_epochs=None,
        process_index=index,
        process_count=count,
    )
    total_steps = _total_steps(cfg, loader)
    optimizer, schedule = make_optimizer(t, total_steps)
    key = jax.random.key(cfg.seed)
    lora = init_lora(mcfg, cfg.lora, jax.random.fold_in(key, 1))
    lora_s = plan.lora_shardings(lora)
    opt_s = plan.like_shardings(jax.eval_shape(optimizer.init, lora), lora, lora_s)
    lora = plan.place(lora, lora_s)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_s)(lora)
    scale = plan.replicate(np.asarray(lora_scale(mcfg, cfg.lora), np.float32))
    key_data = rng_to_array(key)  # checkpoints hold the key as a host array

    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep)
    step = 0
    if resuming:
        step = ckpt.latest_step()
        like = {"lora": lora, "opt_state": opt_state, "rng": key_data}  # target shardings: this plan's
        state, meta = ckpt.restore(step, like)
        lora, opt_state, key_data = state["lora"], state["opt_state"], np.asarray(state["rng"])
        loader.restore(meta["data"])
    key = rng_from_array(plan.replicate(key_data))
    step_rng = jax.jit(jax.random.fold_in, out_shardings=plan.replicated)

    spec = StepSpec(mcfg, cfg.lora.dropout, t.loss_chunk_size)
    step_fn = plan.compile_train_step(make_train_step(spec, optimizer, plan.axis_name), lora_s, opt_s, base_s)
    eval_fn = plan.compile_eval_step(make_eval_step(spec, plan.axis_name), lora_s, base_s)
    logger = MetricsLogger(out, tensorboard=cfg.logging.tensorboard, enabled=main)
    result = TrainResult(out, step)

    def save(at: int):
        meta = {"step": at, "data": loader.state()}
        ckpt.save(at, {"lora": lora, "opt_state": opt_state, "rng": key_data}, meta)

    def run_eval(at: int):
        metrics = _evaluate(eval_fn, lora, base, scale, val_ex, cfg, plan)
        if metrics is not None:
            logger.log(at, metrics)
            result.eval_history.append((at, metrics["eval/loss"]))
        return metrics

    bar = None
    if cfg.logging.progress_bar and main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    eval_every = t.eval_every_steps
    if eval_every is not None and step == 0:
        run_eval(0)
    pending: list[dict] = []
    last_time, last_logged = time.perf_counter(), step
    stopping = False
    with _StopSignals() as stop:
        while step < total_steps and not stopping:
            micro = [next(loader) for _ in range(t.grad_accum_steps)]
            batch = plan.put_batch({k: np.stack([m[k] for m in micro]) for k in BATCH_KEYS})
            lora, opt_state, m = step_fn(lora, opt_state, base, batch, step_rng(key, step), scale)
            pending.append(m)
            step += 1
            at_log = step % cfg.logging.every_steps == 0 or step == total_steps
            at_ckpt = cfg.checkpoint.every_steps is not None and step % cfg.checkpoint.every_steps == 0
            if not plan.multi_process:
                stopping = bool(stop.received)
            elif at_log or at_ckpt:  # hosts agree to stop together, at an interval where they wait anyway
                stopping = bool(plan.agree(stop.received))
            if at_log or at_ckpt or stopping:
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
        result.interrupted = plan.agree(stop.received)
    save(step)
    if not result.interrupted:
        if eval_every is not None:
            run_eval(step)
        lora_host = plan.to_host(lora)  # a collective when LoRA is sharded over hosts
        if main:
            save_peft_adapter(out / "adapter", lora_host, cfg.lora, mcfg, model_name, overwrite=True)
    if bar is not None:
        bar.close()
    loader.close()
    logger.close()
    ckpt.close()
    result.step = step
    if main:
        state = {"step": step, "finished": not result.interrupted}
        (out / "run_state.json").write_text(json.dumps(state))
    plan.barrier("jaxlora-run-done")
    return result
