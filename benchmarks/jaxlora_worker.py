"""The jaxlora side: train a `BenchSpec` in this process with the library's own step, return measurements.

Imported only in the jaxlora worker process (`benchmarks.harness.run_worker`), after the CPU affinity
is set. `run` measures one spec; `run_many` measures several in turn in one process (the feature runs of
`gpu_suite.sh`), sharing the JAX start-up, the model and the matmul peak.
"""

import dataclasses
import os
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.spec import BenchSpec, model_folder, packed_rows, random_ids
from benchmarks.timing import host_peak_rss, summary, timed_windows
from jaxlora.config import TrainSection
from jaxlora.data import IGNORE
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
from jaxlora.models.attention import choose_attention
from jaxlora.quant import make_quantizer
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import StepSpec, make_train_step


def matmul_peak(dtype: str) -> float:
    """Best FLOP/s of a large square matmul in JAX on the default device."""
    gpu = jax.default_backend() == "gpu"
    n, reps, trials = (8192, 20, 3) if gpu else (2048, 2, 2)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def batches(spec: BenchSpec, vocab: int) -> list[dict]:
    """Random [1, B, T] batches; targets are the next tokens, IGNORE at the end of each example (each row,
    or each packed example when `spec.packed`)."""
    if spec.packed:
        positions, segment_ids = packed_rows(spec)
    else:
        positions = np.broadcast_to(np.arange(spec.seq, dtype=np.int32), (1, spec.batch, spec.seq)).copy()
        segment_ids = np.ones((1, spec.batch, spec.seq), np.int32)
    # The last token of each example has no next token of its own example.
    last = np.ones(segment_ids.shape, bool)
    last[..., :-1] = segment_ids[..., 1:] != segment_ids[..., :-1]
    out = []
    for ids in random_ids(spec, vocab):
        targets = np.where(last, IGNORE, np.roll(ids, -1, axis=-1)).astype(np.int32)
        out.append({"input_ids": ids, "targets": targets, "positions": positions, "segment_ids": segment_ids})
    return out


def _load(spec: BenchSpec):
    """The model, with its weights on the default device (ready: the time to load them ends here).

    Random weights to be quantized are drawn and quantized on the host CPU device, then copied over:
    drawn on the accelerator, the dense bfloat16 model (16 GB for 8B) would set the device's peak memory,
    which must be the training's (JAX has no reset of `peak_bytes_in_use`).
    """
    folder, random = model_folder(spec)
    kw = dict(
        dtype=spec.dtype,
        attention=spec.attention,
        remat=spec.remat,
        quantizer=make_quantizer(spec.quant) if spec.quant != "none" else None,
        random_init_seed=spec.seed if random else None,
    )
    if not (random and spec.quant != "none" and jax.default_backend() != "cpu"):
        model = load_model(str(folder), **kw)
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            model = load_model(str(folder), **kw)
        model = dataclasses.replace(model, params=jax.device_put(model.params, jax.devices()[0]))
    jax.block_until_ready(model.params)
    return model


def run(spec: BenchSpec) -> dict:
    """Train `spec` with jaxlora in this process; returns the worker's measurements.

    Peak memory is the device's `peak_bytes_in_use` (host RSS on the CPU): the process measures one spec.
    """
    t0 = time.perf_counter()
    model = _load(spec)
    return _train(spec, model, time.perf_counter() - t0, compiled_memory=False)


def _model_key(spec: BenchSpec) -> tuple:
    """What `_load` reads of a spec: specs with the same key train the same weights."""
    return (spec.arch, spec.model_path, spec.dtype, spec.quant, spec.seed)


def run_many(specs: list[BenchSpec], deadline: float | None, emit: Callable[[dict], None]) -> None:
    """Train each spec in turn in this process, sharing the model between specs of the same weights.

    `emit` gets, in order: {"matmul_peak_flops": ...} (measured first, once), then per spec {"index": i,
    "start": True} and one of {"index": i, "result": ...}, {"index": i, "skipped": reason} (a UserError:
    the spec cannot run here) or {"index": i, "error": traceback tail}, and {"time_box": i} when the spec
    i would not end before `deadline` (time.time() seconds; the rest is not started). Peak memory is the
    compiled step's (`memory_analysis`): the device's peak counter covers the whole process. Compile
    times after the first spec reuse what the process already tuned (XLA's GEMM autotuning).
    """
    emit({"matmul_peak_flops": {dt: matmul_peak(dt) for dt in ("bfloat16", "float32")}})
    key, model, longest = None, None, 0.0  # longest: seconds of one spec, its model's loading left out
    for i, spec in enumerate(specs):
        load_s = 0.0
        if key != _model_key(spec):
            key, model = None, None  # free the last model before loading the next
        if deadline is not None and time.time() + longest > deadline:
            emit({"time_box": i})
            return
        emit({"index": i, "start": True})
        t0 = time.perf_counter()
        try:
            if model is None:
                model = _load(spec)
                key, load_s = _model_key(spec), time.perf_counter() - t0
            emit({"index": i, "result": _train(spec, model, load_s, compiled_memory=True)})
        except UserError as err:
            emit({"index": i, "skipped": str(err)})
        except Exception:  # one variant's failure (an out-of-memory, say) ends only that one
            emit({"index": i, "error": "\n".join(traceback.format_exc().strip().splitlines()[-15:])})
        longest = max(longest, time.perf_counter() - t0 - load_s)


def _train(spec: BenchSpec, model, load_s: float, compiled_memory: bool) -> dict:
    """Train `spec` on `model`'s weights; `model.config` gets the spec's run-time switches."""
    # packed=False says each row is one example, so the GPU's `auto` attention may pick cuDNN.
    cfg = model.config.with_runtime(
        attention=spec.attention,
        remat=spec.remat,
        packed=spec.packed,
        scan_layers=spec.scan_layers,
        lora_product=spec.lora_product,
    )
    base = model.params
    lora_cfg = LoraConfig(r=spec.r, alpha=spec.alpha, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(spec.seed + 1))
    scale = jnp.asarray(lora_scale(cfg, lora_cfg))
    train = TrainSection(learning_rate=spec.lr, warmup_steps=0, lr_schedule="constant", max_steps=10**6)
    optimizer, _ = make_optimizer(train, 10**6)
    opt_state, lora = jax.jit(optimizer.init)(lora), Adapter.split(lora)
    step_fn = make_train_step(StepSpec(cfg, 0.0, spec.loss_chunk), optimizer)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1) if spec.donate else ())
    host_batches = batches(spec, cfg.vocab_size)
    rng = jax.random.key(spec.seed)

    t0 = time.perf_counter()
    compiled = jitted.lower(lora, opt_state, base, host_batches[0], rng, scale).compile()
    compile_s = time.perf_counter() - t0
    state = {"lora": lora, "opt": opt_state, "i": 0, "metrics": None}
    put = jax.device_put if spec.prefetch else (lambda b: b)
    pending = [put(host_batches[0])]

    def one_step():
        i = state["i"]
        batch = pending.pop()
        pending.append(put(host_batches[(i + 1) % len(host_batches)]))  # next batch on its way
        state["lora"], state["opt"], state["metrics"] = compiled(
            state["lora"], state["opt"], base, batch, jax.random.fold_in(rng, i), scale
        )
        if spec.sync_every_step:
            float(state["metrics"]["loss"])  # what a loop that logs every step pays
        state["i"] = i + 1

    def run_window(n):
        for _ in range(n):
            one_step()
        jax.block_until_ready((state["lora"], state["metrics"]))

    t0 = time.perf_counter()
    run_window(1)
    first_step_s = time.perf_counter() - t0
    loss_first = float(state["metrics"]["loss"])
    run_window(max(spec.warmup - 1, 0))
    if spec.profile_dir:
        with jax.profiler.trace(spec.profile_dir):
            walls, cpus = timed_windows(run_window, spec)
    else:
        walls, cpus = timed_windows(run_window, spec)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    if compiled_memory:
        m = compiled.memory_analysis()
        mem, kind = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes, "compiled"
        mem += m.temp_size_in_bytes
    elif "peak_bytes_in_use" in stats:
        mem, kind = int(stats["peak_bytes_in_use"]), "device"
    else:
        mem, kind = host_peak_rss(), "host_rss"
    return {
        "framework": "jaxlora",
        "device": f"{dev.platform}:{dev.device_kind}",
        "attention_impl": choose_attention(cfg, jnp.dtype(cfg.runtime.compute_dtype), spec.seq),
        "load_s": load_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "loss_first": loss_first,
        "loss_last": float(state["metrics"]["loss"]),
        "peak_memory_bytes": int(mem),
        "memory_kind": kind,
        "threads": len(os.sched_getaffinity(0)) if dev.platform == "cpu" else None,
        **summary(walls, cpus, spec),
    }
