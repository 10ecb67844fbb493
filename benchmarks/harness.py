"""Side-by-side LoRA training speed: jaxlora against transformers + PEFT on the same device.

Each framework runs in its own process (`spawn_worker` -> `run_worker`), on the same architecture, LoRA
rank/alpha/targets, batch, sequence length and gradient-checkpointing setting, with random token batches
and AdamW. A worker returns the median step time after warm-up, tokens/s, peak memory, compile time and
the matmul peak it measured on the device (after training, so the peak memory is the training's);
`run_benchmark` adds the FLOPs (`jaxlora.train.flops`) and the MFU against the best measured peak.
`scripts/benchmark.py` is the command line.
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

from benchmarks.spec import FRAMEWORKS, PEFT_CHECKPOINTING, REMATS, RESULT_TAG, BenchSpec, hf_config
from jaxlora.errors import UserError


def run_worker(framework: str, spec: BenchSpec) -> dict:
    """Run one framework on `spec` in this process (what the benchmark's subprocesses call).

    The matmul peak is measured after training (its buffers are gone by then), on the same device.
    """
    if framework not in FRAMEWORKS:
        raise UserError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
    if spec.threads:  # pin before JAX or PyTorch is imported and starts its thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec.threads])
    worker = importlib.import_module(f"benchmarks.{framework}_worker")
    out = worker.run(spec)
    out["matmul_peak_flops"] = {dt: worker.matmul_peak(dt) for dt in ("bfloat16", "float32")}
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


def feature_specs(base: BenchSpec, gpu: bool) -> list[BenchSpec]:
    """The preset's defaults, then one switch changed at a time (every other remat policy first)."""
    variants = [("default", {})]
    variants += [(f"remat={r}", {"remat": r}) for r in REMATS if r != base.remat]
    variants += [
        ("loss_chunk=256", {"loss_chunk": 256}),
        (f"loss_chunk={base.batch * base.seq}", {"loss_chunk": base.batch * base.seq}),
        ("no scan (unrolled)", {"scan_layers": False}),
        ("no donation", {"donate": False}),
        ("no prefetch", {"prefetch": False}),
        ("host sync every step", {"sync_every_step": True}),
    ]
    if gpu:  # does the CPU's custom-VJP LoRA product pay on the GPU too? Which attention is fastest?
        variants.append(("lora_product=cpu", {"lora_product": "cpu"}))
        variants += [(f"attention={a}", {"attention": a}) for a in ("cudnn", "pallas", "xla")]
    else:
        variants.append(("lora_product=plain", {"lora_product": "plain"}))
    return [base.replace(name=f"{base.name} {label}", **kw) for label, kw in variants]


def add_flops(result: dict, spec: BenchSpec, peaks: dict) -> dict:
    """Add model/recompute FLOPs, achieved FLOP/s and MFU (against the compute dtype's peak and bf16's)."""
    # Imported here, not at the top: the PEFT worker process imports this module and must not load JAX.
    from jaxlora.models.config import config_from_hf
    from jaxlora.train.flops import train_step_flops

    cfg = config_from_hf(hf_config(spec))
    jaxlora = result["framework"] == "jaxlora"
    remat = spec.remat if jaxlora else ("full" if spec.remat in PEFT_CHECKPOINTING else "none")
    flops = train_step_flops(cfg, spec.r, None, spec.batch, spec.seq, remat)
    achieved = flops["model"] / result["median_step_s"]
    out = dict(result)
    out.update(
        model_flops_per_step=flops["model"],
        recompute_flops_per_step=flops["recompute"] if jaxlora else None,
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

    Returns {"runs": [...], "peaks_flops": {...}}; a run holds the spec, the per-framework result (the
    repeat with the median step time, plus every repeat's step time) and `speedup` = PEFT step / jaxlora
    step.
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
