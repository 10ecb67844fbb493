"""The jaxlora side: train a `BenchSpec` in this process with the library's own step, return measurements.

Imported only in the jaxlora worker process (`benchmarks.harness.run_worker`), after the CPU affinity
is set.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.spec import BenchSpec, model_folder, random_ids
from benchmarks.timing import host_peak_rss, summary, timed_windows
from jaxlora.config import TrainSection
from jaxlora.data import IGNORE
from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
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
    """Random [1, B, T] batches; targets are the next tokens, IGNORE at the end of each row."""
    out = []
    for ids in random_ids(spec, vocab):
        targets = np.concatenate([ids[..., 1:], np.full((1, spec.batch, 1), IGNORE, np.int32)], axis=-1)
        positions = np.broadcast_to(np.arange(spec.seq, dtype=np.int32), ids.shape).copy()
        out.append(
            {"input_ids": ids, "targets": targets, "positions": positions, "segment_ids": np.ones_like(ids)}
        )
    return out


def _load(spec: BenchSpec):
    """The model, with its weights on the default device.

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
        return load_model(str(folder), **kw)
    with jax.default_device(jax.devices("cpu")[0]):
        model = load_model(str(folder), **kw)
    return dataclasses.replace(model, params=jax.device_put(model.params, jax.devices()[0]))


def run(spec: BenchSpec) -> dict:
    """Train `spec` with jaxlora in this process; returns the worker's measurements."""
    t0 = time.perf_counter()
    model = _load(spec)
    # Each row is one example (no packing), so the GPU's `auto` attention may pick cuDNN.
    cfg = model.config.with_runtime(
        packed=False, scan_layers=spec.scan_layers, lora_product=spec.lora_product
    )
    base = jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    lora_cfg = LoraConfig(r=spec.r, alpha=spec.alpha, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(spec.seed + 1))
    scale = jnp.asarray(lora_scale(cfg, lora_cfg))
    train = TrainSection(learning_rate=spec.lr, warmup_steps=0, lr_schedule="constant", max_steps=10**6)
    optimizer, _ = make_optimizer(train, 10**6)
    opt_state = jax.jit(optimizer.init)(lora)
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
    if "peak_bytes_in_use" in stats:
        mem, kind = int(stats["peak_bytes_in_use"]), "device"
    else:
        mem, kind = host_peak_rss(), "host_rss"
    return {
        "framework": "jaxlora",
        "device": f"{dev.platform}:{dev.device_kind}",
        "load_s": load_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "loss_first": loss_first,
        "loss_last": float(state["metrics"]["loss"]),
        "peak_memory_bytes": mem,
        "memory_kind": kind,
        "threads": len(os.sched_getaffinity(0)) if dev.platform == "cpu" else None,
        **summary(walls, cpus, spec),
    }
