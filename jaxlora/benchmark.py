"""Side-by-side LoRA training speed: jaxlora against transformers + PEFT on the same device.

Each framework runs in its own process (`run_worker`), on the same architecture, LoRA rank/alpha/targets,
batch, sequence length and gradient-checkpointing setting, with random token batches and AdamW. A worker
returns the median step time after warm-up, tokens/s, peak memory, compile time and the matmul peak it
measured on the device (after training, so the peak memory is the training's); `run_benchmark` adds the
FLOPs (`jaxlora.flops`) and the MFU against the best measured peak. `scripts/benchmark.py` is the
command line; docs/performance.md explains the figures.
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxlora.errors import UserError

RESULT_TAG = "JAXLORA_BENCH_RESULT "
FRAMEWORKS = ("jaxlora", "peft")

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ARCHS = {  # Hugging Face config.json contents (weights are random)
    "tiny": {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 24,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One measured configuration (what both frameworks run)."""

    name: str
    arch: str  # a key of ARCHS, or "stories260k" (the real model in the test assets)
    batch: int
    seq: int
    dtype: str = "bfloat16"  # parameter and compute dtype
    quant: str = "none"  # none | int8 | nf4 (frozen base weights)
    r: int = 16
    alpha: float = 32.0
    remat: str = "none"  # jaxlora train.remat; PEFT: gradient checkpointing unless "none"
    attention: str = "xla"  # jaxlora model.attention; PEFT always uses sdpa
    loss_chunk: int = 1024
    scan_layers: bool = True
    donate: bool = True
    prefetch: bool = True
    sync_every_step: bool = False
    steps: int = 10  # timed steps
    warmup: int = 3
    window: int = 5  # steps per timed window (one host sync per window)
    lr: float = 1e-4
    seed: int = 0
    threads: int = 0  # CPU only: cores (affinity) and intra-op threads of both frameworks; 0 = defaults
    model_path: str = ""  # the real model's folder when arch == "stories260k"
    profile_dir: str = ""  # jaxlora only: a jax.profiler trace of the timed steps

    def replace(self, **kw) -> "BenchSpec":
        return dataclasses.replace(self, **kw)


PRESETS = {
    "tiny": BenchSpec(
        "tiny", "tiny", batch=2, seq=64, dtype="float32", r=4, alpha=8.0, steps=4, warmup=2, window=2
    ),
    "stories260k": BenchSpec(
        "stories260k", "stories260k", batch=8, seq=256, dtype="float32", r=8, alpha=16.0, steps=20
    ),
    "llama-3.2-1b": BenchSpec("llama-3.2-1b", "llama-3.2-1b", batch=8, seq=2048),
    "llama-3.2-1b-8k": BenchSpec("llama-3.2-1b-8k", "llama-3.2-1b", batch=2, seq=8192),
    "llama-3.1-8b": BenchSpec("llama-3.1-8b", "llama-3.1-8b", batch=4, seq=2048),
    "llama-3.1-8b-int8": BenchSpec("llama-3.1-8b-int8", "llama-3.1-8b", batch=4, seq=2048, quant="int8"),
    "llama-3.1-8b-nf4": BenchSpec("llama-3.1-8b-nf4", "llama-3.1-8b", batch=4, seq=2048, quant="nf4"),
    "llama-3.1-8b-8k": BenchSpec("llama-3.1-8b-8k", "llama-3.1-8b", batch=1, seq=8192),
    "qwen2.5-0.5b": BenchSpec("qwen2.5-0.5b", "qwen2.5-0.5b", batch=8, seq=2048),
    "qwen2.5-0.5b-8k": BenchSpec("qwen2.5-0.5b-8k", "qwen2.5-0.5b", batch=2, seq=8192),
}
SUITES = {
    "cpu": ["tiny", "stories260k"],
    "gpu": [
        "llama-3.2-1b",
        "llama-3.2-1b-8k",
        "qwen2.5-0.5b",
        "qwen2.5-0.5b-8k",
        "llama-3.1-8b",
        "llama-3.1-8b-int8",
        "llama-3.1-8b-nf4",
        "llama-3.1-8b-8k",
    ],
}


def hf_config(spec: BenchSpec) -> dict:
    """The Hugging Face config.json of the spec's architecture."""
    if spec.arch == "stories260k":
        return json.loads((Path(spec.model_path) / "config.json").read_text())
    if spec.arch not in ARCHS:
        raise UserError(f"unknown architecture {spec.arch!r}; known: stories260k, {', '.join(ARCHS)}")
    return dict(ARCHS[spec.arch])


def _model_folder(spec: BenchSpec, tmp: str) -> tuple[str, bool]:
    """(folder holding config.json, random weights?)."""
    if spec.arch == "stories260k":
        if not (Path(spec.model_path) / "model.safetensors").is_file():
            raise UserError(
                f"stories260K not found at {spec.model_path!r}; pass --assets or set JAXLORA_ASSETS"
            )
        return spec.model_path, False
    Path(tmp, "config.json").write_text(json.dumps(hf_config(spec)))
    return tmp, True


def _batches(spec: BenchSpec, vocab: int, n: int = 4) -> list[dict]:
    """`n` random [1, B, T] batches (one micro-step each); targets are the next tokens, -100 at the end."""
    rng = np.random.default_rng(spec.seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (1, spec.batch, spec.seq)).astype(np.int32)
        targets = np.concatenate([ids[..., 1:], np.full((1, spec.batch, 1), -100, np.int32)], axis=-1)
        positions = np.broadcast_to(np.arange(spec.seq, dtype=np.int32), ids.shape).copy()
        out.append(
            {"input_ids": ids, "targets": targets, "positions": positions, "segment_ids": np.ones_like(ids)}
        )
    return out


def _host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed_windows(run_window, spec: BenchSpec) -> tuple[list[float], list[float]]:
    """Per-step wall and CPU seconds of each window of `spec.window` steps (one sync per window)."""
    window = 1 if spec.sync_every_step else max(1, spec.window)
    n_windows = max(1, -(-spec.steps // window))
    walls, cpus = [], []
    for _ in range(n_windows):
        c0, w0 = time.process_time(), time.perf_counter()
        run_window(window)
        walls.append((time.perf_counter() - w0) / window)
        cpus.append((time.process_time() - c0) / window)
    return walls, cpus


def _summary(walls, cpus, spec: BenchSpec) -> dict:
    step = statistics.median(walls)
    return {
        "median_step_s": step,
        "min_step_s": min(walls),
        "max_step_s": max(walls),
        "median_step_cpu_s": statistics.median(cpus),
        "timed_steps": len(walls) * (1 if spec.sync_every_step else max(1, spec.window)),
        "tokens_per_s": spec.batch * spec.seq / step,
    }


def matmul_peak_jax(dtype: str) -> float:
    """Best FLOP/s of a large square matmul in JAX on the default device."""
    import jax
    import jax.numpy as jnp

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


def matmul_peak_torch(dtype: str) -> float:
    """Best FLOP/s of a large square matmul in PyTorch on the benchmark device."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, reps, trials = (8192, 20, 3) if dev == "cuda" else (2048, 2, 2)
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
    a @ a
    best = float("inf")
    for _ in range(trials):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ a
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def run_jaxlora(spec: BenchSpec) -> dict:
    """Train `spec` with jaxlora in this process; returns the worker's measurements."""
    import jax
    import jax.numpy as jnp

    from jaxlora.config import LoraSection, TrainSection
    from jaxlora.lora import init_lora, lora_scale
    from jaxlora.models import load_model
    from jaxlora.quant import make_quantizer
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.step import StepSpec, make_train_step

    with tempfile.TemporaryDirectory() as tmp:
        folder, random = _model_folder(spec, tmp)
        t0 = time.perf_counter()
        model = load_model(
            folder,
            dtype=spec.dtype,
            attention=spec.attention,
            remat=spec.remat,
            quantizer=make_quantizer(spec.quant) if spec.quant != "none" else None,
            random_init_seed=spec.seed if random else None,
        )
    cfg = model.config if spec.scan_layers else model.config.with_runtime(scan_layers=False)
    base = jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    lora_cfg = LoraSection(r=spec.r, alpha=spec.alpha, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lora_cfg, jax.random.key(spec.seed + 1))
    scale = jnp.asarray(lora_scale(cfg, lora_cfg))
    train = TrainSection(learning_rate=spec.lr, warmup_steps=0, lr_schedule="constant", max_steps=10**6)
    optimizer, _ = make_optimizer(train, 10**6)
    opt_state = jax.jit(optimizer.init)(lora)
    step_fn = make_train_step(StepSpec(cfg, 0.0, spec.loss_chunk), optimizer)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1) if spec.donate else ())
    host_batches = _batches(spec, cfg.vocab_size)
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
            walls, cpus = _timed_windows(run_window, spec)
    else:
        walls, cpus = _timed_windows(run_window, spec)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem, kind = int(stats["peak_bytes_in_use"]), "device"
    else:
        mem, kind = _host_peak_rss(), "host_rss"
    out = {
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
        **_summary(walls, cpus, spec),
    }
    return out


def _peft_model(spec: BenchSpec, folder: str, random: bool, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    if spec.quant != "none":
        if device != "cuda":
            raise UserError("the PEFT baseline quantizes with bitsandbytes, which needs a CUDA GPU")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as err:  # pragma: no cover - depends on the install
            raise UserError(
                "the PEFT int8/nf4 baseline needs bitsandbytes: pip install bitsandbytes"
            ) from err
        if spec.quant == "int8":
            qcfg = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qcfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantizes while loading a checkpoint
            with torch.device(device):
                dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
            dense.save_pretrained(tmp)
            del dense
            torch.cuda.empty_cache()
            return AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=qcfg, dtype=dtype, attn_implementation="sdpa", device_map={"": 0}
            )
    if random:
        torch.manual_seed(spec.seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(folder), dtype=dtype, attn_implementation="sdpa"
            )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)


def run_peft(spec: BenchSpec) -> dict:
    """Train `spec` with transformers + PEFT (sdpa attention, AdamW, clipping at 1.0) in this process."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.threads and device == "cpu":
        torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, random = _model_folder(spec, tmp)
        t0 = time.perf_counter()
        model = _peft_model(spec, folder, random, device)
    checkpointing = spec.remat != "none"
    if spec.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora_cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora_cfg)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = [
        torch.from_numpy(b["input_ids"][0]).long().to(device) for b in _batches(spec, model.config.vocab_size)
    ]
    state = {"i": 0, "loss": None}

    def one_step():
        ids = batches[state["i"] % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside, as our targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss.detach()
        if spec.sync_every_step:
            float(state["loss"])
        state["i"] += 1

    def run_window(n):
        for _ in range(n):
            one_step()
        sync()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_window(1)
    first_step_s = time.perf_counter() - t0
    loss_first = float(state["loss"])
    run_window(max(spec.warmup - 1, 0))
    walls, cpus = _timed_windows(run_window, spec)
    if device == "cuda":
        mem, kind = int(torch.cuda.max_memory_allocated()), "device"
        name = f"gpu:{torch.cuda.get_device_name()}"
    else:
        mem, kind, name = _host_peak_rss(), "host_rss", "cpu"
    out = {
        "framework": "peft",
        "device": name,
        "load_s": load_s,
        "compile_s": 0.0,  # eager PyTorch: nothing is compiled ahead of the first step
        "first_step_s": first_step_s,
        "loss_first": loss_first,
        "loss_last": float(state["loss"]),
        "peak_memory_bytes": mem,
        "memory_kind": kind,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__},
        **_summary(walls, cpus, spec),
    }
    return out


def run_worker(framework: str, spec: BenchSpec) -> dict:
    """Run one framework on `spec` in this process (what the benchmark's subprocesses call).

    The matmul peak is measured after training (its buffers are gone by then), on the same device.
    """
    if framework not in FRAMEWORKS:
        raise UserError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
    if spec.threads:  # pin before JAX or PyTorch starts its thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec.threads])
    out = run_jaxlora(spec) if framework == "jaxlora" else run_peft(spec)
    peak = matmul_peak_jax if framework == "jaxlora" else matmul_peak_torch
    out["matmul_peak_flops"] = {dt: peak(dt) for dt in ("bfloat16", "float32")}
    return out


def spawn_worker(script: str, framework: str, spec: BenchSpec, env: dict | None = None) -> dict:
    """Run `script --worker FRAMEWORK SPEC_JSON` in a fresh Python process; returns its result dict."""
    cmd = [sys.executable, script, "--worker", framework, json.dumps(dataclasses.asdict(spec))]
    env = dict(os.environ if env is None else env)
    if spec.threads:  # read by XLA:CPU at start-up; PyTorch sets its own in the worker
        flags = f"--xla_cpu_multi_thread_eigen={'true' if spec.threads > 1 else 'false'} "
        flags += f"intra_op_parallelism_threads={spec.threads}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        env["OMP_NUM_THREADS"] = str(spec.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    if proc.returncode == 2 and tail.splitlines()[-1].startswith("error: "):  # a UserError in the worker
        raise UserError(f"{framework} on {spec.name}: {tail.splitlines()[-1][len('error: ') :]}")
    raise RuntimeError(f"{framework} worker for {spec.name} failed (exit {proc.returncode}):\n{tail}")


def add_flops(result: dict, spec: BenchSpec, peaks: dict) -> dict:
    """Add model/recompute FLOPs, achieved FLOP/s and MFU (against the compute dtype's peak and bf16's)."""
    from jaxlora.flops import train_step_flops
    from jaxlora.models.config import config_from_hf

    cfg = config_from_hf(hf_config(spec))
    remat = spec.remat if result["framework"] == "jaxlora" else ("full" if spec.remat != "none" else "none")
    flops = train_step_flops(cfg, spec.r, None, spec.batch, spec.seq, remat)
    achieved = flops["model"] / result["median_step_s"]
    out = dict(result)
    out.update(
        model_flops_per_step=flops["model"],
        recompute_flops_per_step=flops["recompute"] if result["framework"] == "jaxlora" else None,
        flops_breakdown={k: v for k, v in flops.items() if k not in ("model", "recompute")},
        achieved_tflops=achieved / 1e12,
        mfu=achieved / peaks[spec.dtype],
        mfu_bf16_peak=achieved / peaks["bfloat16"],
    )
    return out


def run_benchmark(
    specs: list[BenchSpec], script: str, frameworks=FRAMEWORKS, repeats: int = 1, log=print
) -> dict:
    """Measure every spec with every framework (each run its own process, repeats interleaved).

    Returns {"runs": [...], "peaks": {...}}; a run holds the spec, the per-framework result (the repeat
    with the median step time, plus every repeat's step time) and `speedup` = PEFT step / jaxlora step.
    """
    raw: dict = {}
    for rep in range(repeats):
        for spec in specs:
            for fw in frameworks:
                log(f"[{rep + 1}/{repeats}] {spec.name}: {fw} ...")
                raw.setdefault((spec.name, fw), []).append(spawn_worker(script, fw, spec))
    peaks: dict = {}
    for results in raw.values():
        for r in results:
            for dt, v in r["matmul_peak_flops"].items():
                peaks[dt] = max(peaks.get(dt, 0.0), v)
    runs = []
    for spec in specs:
        run = {"spec": dataclasses.asdict(spec), "results": {}}
        for fw in frameworks:
            results = sorted(raw[(spec.name, fw)], key=lambda r: r["median_step_s"])
            chosen = dict(results[len(results) // 2])
            chosen["repeat_step_s"] = [r["median_step_s"] for r in raw[(spec.name, fw)]]
            run["results"][fw] = add_flops(chosen, spec, peaks)
        if set(frameworks) >= {"jaxlora", "peft"}:
            res = run["results"]
            run["speedup"] = res["peft"]["median_step_s"] / res["jaxlora"]["median_step_s"]
        runs.append(run)
    return {"runs": runs, "peaks_flops": peaks}


def format_table(report: dict) -> str:
    """A plain-text table of a `run_benchmark` report."""
    head = (
        f"{'preset':18s} {'framework':8s} {'tokens/s':>10s} {'step ms':>9s} {'cpu ms':>8s} "
        f"{'peak MiB':>9s} {'compile s':>9s} {'TFLOP/s':>8s} {'MFU':>7s} {'MFU/bf16':>8s}"
    )
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        for fw, r in run["results"].items():
            lines.append(
                f"{run['spec']['name']:18s} {fw:8s} {r['tokens_per_s']:10.0f} "
                f"{r['median_step_s'] * 1e3:9.1f} {r['median_step_cpu_s'] * 1e3:8.1f} "
                f"{r['peak_memory_bytes'] / 2**20:9.0f} "
                f"{r['compile_s']:9.2f} {r['achieved_tflops']:8.3f} {r['mfu']:7.2%} {r['mfu_bf16_peak']:8.2%}"
            )
        if "speedup" in run:
            lines.append(
                f"{'':18s} jaxlora vs PEFT: {run['speedup']:.2f}x (PEFT step time / jaxlora step time)"
            )
    peaks = ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in report["peaks_flops"].items())
    lines.append(f"measured matmul peaks: {peaks}")
    return "\n".join(lines)
