"""Timing shared by the workers: windows of steps with one host sync each, and their summary."""

import resource
import statistics
import time
from collections.abc import Callable

from benchmarks.spec import BenchSpec


def host_peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def steps_per_window(spec: BenchSpec) -> int:
    return 1 if spec.sync_every_step else max(1, spec.window)


def timed_windows(run_window: Callable[[int], None], spec: BenchSpec) -> tuple[list[float], list[float]]:
    """Per-step wall and CPU seconds of each window of `spec.window` steps (one sync per window)."""
    window = steps_per_window(spec)
    n_windows = max(1, -(-spec.steps // window))
    walls, cpus = [], []
    for _ in range(n_windows):
        c0, w0 = time.process_time(), time.perf_counter()
        run_window(window)
        walls.append((time.perf_counter() - w0) / window)
        cpus.append((time.process_time() - c0) / window)
    return walls, cpus


def summary(walls: list[float], cpus: list[float], spec: BenchSpec) -> dict:
    """Median, min and max step time, median CPU time per step, timed steps and tokens/s."""
    step = statistics.median(walls)
    return {
        "median_step_s": step,
        "min_step_s": min(walls),
        "max_step_s": max(walls),
        "median_step_cpu_s": statistics.median(cpus),
        "timed_steps": len(walls) * steps_per_window(spec),
        "tokens_per_s": spec.batch * spec.seq / step,
    }
