"""Side-by-side LoRA training speed: jaxlora against transformers + PEFT on the same device.

Each framework runs in its own process (`spawn_worker` -> `run_worker`), on the same architecture, LoRA
rank/alpha/targets, batch, sequence length and gradient-checkpointing setting, with random token batches
and AdamW. A worker returns the median step time after warm-up, tokens/s, peak memory, compile time and
the matmul peak it measured on the device (after training, so the peak memory is the training's);
`run_benchmark` adds the FLOPs (`jaxlora.train.flops`) and the MFU against the best measured peak.
Feature runs (`benchmarks.features`) can measure every variant in one jaxlora process (`run_worker_many`)
and stop at a time box, reporting what they left out and why.
`scripts/benchmark.py` is the command line.
"""

import dataclasses
import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from benchmarks.spec import FRAMEWORKS, PEFT_CHECKPOINTING, RESULT_TAG, BenchSpec, hf_config
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


def run_worker_many(
    framework: str, specs: list[BenchSpec], deadline: float | None, emit: Callable[[dict], None]
) -> None:
    """Run every spec in turn in this process (jaxlora only): `benchmarks.jaxlora_worker.run_many`."""
    if framework != "jaxlora":
        raise UserError(f"one process for several specs is for jaxlora only, not {framework!r}")
    if specs and specs[0].threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: specs[0].threads])
    importlib.import_module("benchmarks.jaxlora_worker").run_many(specs, deadline, emit)


def _worker_env(spec: BenchSpec, env: dict | None) -> dict:
    env = dict(os.environ if env is None else env)
    if spec.threads:  # read by XLA:CPU at start-up; PyTorch sets its own in the worker
        flags = f"--xla_cpu_multi_thread_eigen={'true' if spec.threads > 1 else 'false'} "
        flags += f"intra_op_parallelism_threads={spec.threads}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        env["OMP_NUM_THREADS"] = str(spec.threads)
    return env


def spawn_worker(
    script: str, framework: str, spec: BenchSpec, env: dict | None = None, timeout: float | None = None
) -> dict:
    """Run `script --worker FRAMEWORK SPEC_JSON` in a fresh Python process; returns its result dict.

    Past `timeout` seconds the process is killed and `subprocess.TimeoutExpired` raised.
    """
    cmd = [sys.executable, script, "--worker", framework, json.dumps(dataclasses.asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(spec, env), timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    if proc.returncode == 2 and tail.splitlines()[-1].startswith("error: "):  # a UserError in the worker
        raise UserError(f"{framework} on {spec.name}: {tail.splitlines()[-1][len('error: ') :]}")
    raise RuntimeError(f"{framework} worker for {spec.name} failed (exit {proc.returncode}):\n{tail}")


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


NOT_REACHED = "not measured: the benchmark stopped before it"


class _Progress:
    """What a benchmark has measured so far, and what it left out and why."""

    def __init__(self, specs: list[BenchSpec], frameworks, skip: dict[str, str]):
        self.specs, self.frameworks = specs, tuple(frameworks)
        self.raw: dict = {}  # (spec name, framework) -> [result of each repeat]
        self.skipped = dict(skip)  # spec name -> why it was not measured
        self.failed: dict[str, str] = {}  # spec name -> the error

    def left_out(self, spec: BenchSpec) -> bool:
        return spec.name in self.skipped or spec.name in self.failed

    def report(self, unmeasured: str = NOT_REACHED) -> dict:
        """{"runs", "peaks_flops", "skipped", "failed"}: a spec is a run once every framework measured it;
        one that is not gets `unmeasured` as its reason, unless it was skipped or failed."""
        peaks: dict = {}
        for results in self.raw.values():
            for r in results:
                for dt, v in r["matmul_peak_flops"].items():
                    peaks[dt] = max(peaks.get(dt, 0.0), v)
        runs, skipped, failed = [], [], []
        for spec in self.specs:
            measured = [self.raw.get((spec.name, fw)) for fw in self.frameworks]
            if not all(measured):
                if spec.name in self.failed:
                    failed.append({"spec": dataclasses.asdict(spec), "error": self.failed[spec.name]})
                else:
                    reason = self.skipped.get(spec.name, unmeasured)
                    skipped.append({"spec": dataclasses.asdict(spec), "reason": reason})
                continue
            run = {"spec": dataclasses.asdict(spec), "results": {}}
            for fw, raw in zip(self.frameworks, measured, strict=True):
                chosen = dict(sorted(raw, key=lambda r: r["median_step_s"])[len(raw) // 2])
                chosen["repeat_step_s"] = [r["median_step_s"] for r in raw]
                run["results"][fw] = add_flops(chosen, spec, peaks)
            if set(self.frameworks) >= {"jaxlora", "peft"}:
                res = run["results"]
                run["speedup"] = res["peft"]["median_step_s"] / res["jaxlora"]["median_step_s"]
            runs.append(run)
        return {"runs": runs, "peaks_flops": peaks, "skipped": skipped, "failed": failed}


def run_benchmark(
    specs: list[BenchSpec],
    script: str,
    frameworks=FRAMEWORKS,
    repeats: int = 1,
    log=print,
    *,
    skip: dict[str, str] | None = None,
    keep_going: bool = False,
    one_process: bool = False,
    time_box: float | None = None,
    started: float | None = None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Measure every spec with every framework (each run its own process, repeats interleaved).

    Returns {"runs": [...], "peaks_flops": {...}, "skipped": [...], "failed": [...]}; a run holds the
    spec, the per-framework result (the repeat with the median step time, plus every repeat's step time)
    and `speedup` = PEFT step / jaxlora step. skip: {spec name: reason}, specs not to measure. keep_going:
    a spec that cannot run here (a UserError) is skipped with its message, one that fails otherwise is
    reported under "failed", and the others still run; without it both end the benchmark. one_process:
    jaxlora only, every measurement in one worker process (`run_worker_many`). time_box: seconds from
    `started` (time.monotonic(), default now); no measurement starts that would not end within it (judged
    by the longest so far), one still running at its end is stopped, and what is left is skipped with the
    reason. on_update: gets the report so far after each measurement (to write it out: a killed
    benchmark keeps what it measured).
    """
    progress = _Progress(specs, frameworks, skip or {})
    end = None if time_box is None else (time.monotonic() if started is None else started) + time_box
    boxed = f"not measured: the time box of {time_box:.0f} s ran out" if time_box is not None else ""
    jobs = [(rep, spec) for rep in range(repeats) for spec in specs if spec.name not in progress.skipped]
    if one_process:
        _run_one_process(
            jobs, script, frameworks, repeats, log, progress, end, time_box, keep_going, on_update
        )
        return progress.report(boxed or NOT_REACHED)
    longest = 0.0
    for rep, spec in jobs:
        for fw in frameworks:
            if progress.left_out(spec):
                break
            left = None if end is None else end - time.monotonic()
            if left is not None and left < max(longest, 1.0):
                return progress.report(boxed)
            log(f"[{rep + 1}/{repeats}] {spec.name}: {fw} ...")
            t0 = time.monotonic()
            try:
                result = spawn_worker(script, fw, spec, timeout=left)
            except subprocess.TimeoutExpired:
                progress.skipped[spec.name] = f"stopped at the end of the time box ({time_box:.0f} s)"
            except UserError as err:
                if not keep_going:
                    raise
                progress.skipped[spec.name] = str(err)
            except RuntimeError as err:
                if not keep_going:
                    raise
                progress.failed[spec.name] = str(err)
            else:
                progress.raw.setdefault((spec.name, fw), []).append(result)
            longest = max(longest, time.monotonic() - t0)
            if on_update:
                on_update(progress.report())
    return progress.report(boxed or NOT_REACHED)


def _run_one_process(jobs, script, frameworks, repeats, log, progress, end, time_box, keep_going, on_update):
    """`run_benchmark`'s measurements in one jaxlora worker process, a new one after a crash."""
    if tuple(frameworks) != ("jaxlora",):
        raise UserError("measuring in one process is for jaxlora alone: pass --frameworks jaxlora")
    while jobs:
        specs = [spec for _, spec in jobs]
        deadline = None if end is None else time.time() + (end - time.monotonic())
        arg = json.dumps({"specs": [dataclasses.asdict(s) for s in specs], "deadline": deadline})
        cmd = [sys.executable, script, "--worker", "jaxlora", arg]
        peaks, current, done, stop = None, None, set(), None
        with tempfile.TemporaryFile("w+") as err:
            env = _worker_env(specs[0], None)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            timed_out: list[bool] = []
            for msg in _messages(proc, end, timed_out):
                if "matmul_peak_flops" in msg:
                    peaks = msg["matmul_peak_flops"]
                elif "time_box" in msg:
                    stop = msg["time_box"]
                elif msg.get("start"):
                    current = msg["index"]
                    rep, spec = jobs[current]
                    log(f"[{rep + 1}/{repeats}] {spec.name}: jaxlora (one process) ...")
                else:
                    rep, spec = jobs[msg["index"]]
                    done.add(msg["index"])
                    if "result" in msg:
                        result = dict(msg["result"], matmul_peak_flops=peaks)
                        progress.raw.setdefault((spec.name, "jaxlora"), []).append(result)
                    elif not keep_going:
                        proc.kill()
                        proc.wait()
                        if "skipped" in msg:
                            raise UserError(msg["skipped"])
                        raise RuntimeError(f"jaxlora worker for {spec.name} failed:\n{msg['error']}")
                    elif "skipped" in msg:
                        progress.skipped[spec.name] = msg["skipped"]
                    else:
                        progress.failed[spec.name] = msg["error"]
                    if on_update:
                        on_update(progress.report())
            killed = bool(timed_out)
            if killed:
                proc.kill()
            proc.wait()
            err.seek(0)
            tail = "\n".join(err.read().strip().splitlines()[-15:])
        if stop is not None or killed:
            if killed and current is not None and current not in done:
                progress.skipped[jobs[current][1].name] = (
                    f"stopped at the end of the time box ({time_box:.0f} s)"
                )
            return
        if proc.returncode == 0 and len(done) == len(jobs):
            return
        # The worker died: the spec it was measuring failed; the rest get a new process.
        error = f"jaxlora worker exited with {proc.returncode}:\n{tail}"
        if current is None or current in done or not keep_going:
            if not keep_going:
                raise RuntimeError(error)
            for _, spec in jobs:
                progress.failed.setdefault(spec.name, error)
            return
        progress.failed[jobs[current][1].name] = error
        if on_update:
            on_update(progress.report())
        jobs = [job for n, job in enumerate(jobs) if n > current and not progress.left_out(job[1])]


def _messages(proc: subprocess.Popen, end: float | None, timed_out: list):
    """The worker's tagged lines as dicts, until its output ends or `end` (time.monotonic) passes (then
    `timed_out` gets True)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=None if end is None else max(end - time.monotonic(), 0.0) + 2.0)
        except queue.Empty:
            timed_out.append(True)
            return
        if line is None:
            return
        if line.startswith(RESULT_TAG):
            yield json.loads(line[len(RESULT_TAG) :])


def format_table(report: dict) -> str:
    """A plain-text table of a `run_benchmark` report, then what it left out and why."""
    w = max([18] + [len(run["spec"]["name"]) for run in report["runs"]])
    head = (
        f"{'preset':{w}s} {'framework':8s} {'tokens/s':>10s} {'step ms':>9s} {'cpu ms':>8s} "
        f"{'peak MiB':>9s} {'compile s':>9s} {'TFLOP/s':>8s} {'MFU':>7s} {'MFU/bf16':>8s}"
    )
    lines = [head, "-" * len(head)]
    for run in report["runs"]:
        for fw, r in run["results"].items():
            lines.append(
                f"{run['spec']['name']:{w}s} {fw:8s} {r['tokens_per_s']:10.0f} "
                f"{r['median_step_s'] * 1e3:9.1f} {r['median_step_cpu_s'] * 1e3:8.1f} "
                f"{r['peak_memory_bytes'] / 2**20:9.0f} "
                f"{r['compile_s']:9.2f} {r['achieved_tflops']:8.3f} {r['mfu']:7.2%} {r['mfu_bf16_peak']:8.2%}"
            )
        if "speedup" in run:
            lines.append(
                f"{'':{w}s} jaxlora vs PEFT: {run['speedup']:.2f}x (PEFT step time / jaxlora step time)"
            )
    peaks = ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in report["peaks_flops"].items())
    lines.append(f"measured matmul peaks: {peaks}")
    for row in report.get("skipped", []):
        lines.append(f"skipped {row['spec']['name']}: {row['reason']}")
    for row in report.get("failed", []):
        lines.append(f"FAILED {row['spec']['name']}: {row['error'].strip().splitlines()[-1]}")
    return "\n".join(lines)
