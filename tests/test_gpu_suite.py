"""[gpu] `benchmarks/gpu_suite.sh --smoke`: the GPU suite's own code on CPU with tiny presets, so it cannot
rot between the sessions that have a GPU (about two minutes on 2 cores); and the pieces of it that only a
GPU run would reach: the file names of each card, and the feature step's time box and crash handling."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_writes_its_reports(tmp_path, assets):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAXLORA_ASSETS=str(assets))
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    suite = (tmp_path / "suite.txt").read_text() if (tmp_path / "suite.txt").exists() else ""
    assert proc.returncode == 0, suite + proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = (
        "pytest -m gpu",
        "benchmark tiny",
        "benchmark tiny-int8",
        "benchmark tiny-nf4",
        "benchmark --features tiny",
    )
    for step in steps:
        assert f"== {step}: ok in" in suite, suite
    assert "== plans: not run in the smoke" in suite  # (f) is the GPU's: five 8B compilations
    assert "backend cpu" in suite and "devices: cpu" in suite
    assert re.search(r"device: cpu, \d+ GiB -> file prefix smoke-cpu, tiny presets", suite)  # from JAX
    for name in ("orbax-checkpoint", "tensorboardX", "trl"):
        assert f"| {name} " in suite
    # (a) collected the gpu tests (collect only on CPU) without an import error
    collected = (tmp_path / "pytest.log").read_text()
    assert "tests/test_gpu.py::test_bf16_finetune_on_gpu_tracks_float32_on_cpu" in collected
    assert not re.search(r"\d+ errors?\b", collected), collected[-2000:]

    # (b) jaxlora against PEFT in the same run
    (run,) = json.loads((tmp_path / "smoke-cpu-tiny.json").read_text())["runs"]
    assert set(run["results"]) == {"jaxlora", "peft"} and run["speedup"] > 0
    for r in run["results"].values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and 0 < r["mfu_bf16_peak"] < 1
        assert np.isfinite(r["loss_last"])
    # (c) int8 and nf4, jaxlora only, merged into one report
    quant = json.loads((tmp_path / "smoke-cpu-tiny-quant.json").read_text())
    assert [s["quant"] for s in quant["specs"]] == ["int8", "nf4"]
    assert [r["spec"]["name"] for r in quant["runs"]] == ["tiny-int8", "tiny-nf4"]
    for r in (run["results"]["jaxlora"] for run in quant["runs"]):
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and np.isfinite(r["loss_last"])
    assert all(v > 0 for v in quant["peaks_flops"].values())

    # (d) the speed switches in one process: attention x packing and the remat policies against the default
    features = json.loads((tmp_path / "smoke-cpu-tiny-features.json").read_text())
    assert "--features attention,remat --one-process" in features["command"] and not features["failed"]
    runs = {run["spec"]["name"].removeprefix("tiny "): run for run in features["runs"]}
    assert list(runs) == [
        "default",
        "attention=xla packing=on",
        "attention=reference packing=on",
        "remat=none",
        "remat=fast",
        "remat=dots",
        "remat=full",
        "attention=reference packing=off",
    ]
    ran = {name: run["results"]["jaxlora"]["attention_impl"] for name, run in runs.items()}
    assert ran["default"] == ran["attention=xla packing=on"] == "xla"  # auto runs xla on the CPU
    assert ran["attention=reference packing=on"] == ran["attention=reference packing=off"] == "reference"
    remats = ("none", "fast", "dots", "full")  # minimal is full; offload needs a GPU
    assert [runs[f"remat={r}"]["spec"]["remat"] for r in remats] == list(remats)
    assert runs["attention=xla packing=on"]["spec"]["packed"] and not runs["default"]["spec"]["packed"]
    for r in (run["results"]["jaxlora"] for run in runs.values()):
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["memory_kind"] == "compiled"
        assert np.isfinite(r["loss_last"])
    skipped = {row["spec"]["name"].removeprefix("tiny "): row["reason"] for row in features["skipped"]}
    for impl in ("cudnn", "pallas"):
        for packing in ("off", "on"):
            assert "needs an NVIDIA GPU" in skipped.pop(f"attention={impl} packing={packing}")
    assert skipped == {
        "attention=xla packing=off": "the same measurement as 'tiny default' "
        "(model.attention=auto runs xla here)"
    }


def test_gpu_suite_names_files_after_the_card():
    script = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    slug = re.search(r"^gpu_slug\(\) \{.*?^\}", script, re.S | re.M).group(0)
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu", ""]
    calls = "; ".join(f"gpu_slug '{n}'" for n in names)
    out = subprocess.run(["bash", "-c", f"{slug}\n{calls}"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["h100", "h100", "h200", "a100-sxm4-80gb", "cpu", "unknown"]


FAKE_WORKER = """
import json, sys, time
emit = lambda msg: print(TAG + json.dumps(msg), flush=True)
emit({"matmul_peak_flops": {"bfloat16": 1e12, "float32": 1e12}})
result = {"framework": "jaxlora", "median_step_s": 0.1, "median_step_cpu_s": 0.1, "tokens_per_s": 1.0}
result.update(compile_s=1.0, peak_memory_bytes=1)
for i, spec in enumerate(json.loads(sys.argv[3])["specs"]):
    emit({"index": i, "start": True})
    if spec["name"] == "crash":
        sys.exit("the worker died")
    if spec["name"] == "hang":
        time.sleep(60)
    emit({"index": i, "result": result})
"""


def test_one_process_features_survive_a_crash_and_stop_at_the_time_box(tmp_path):
    """A variant that kills its worker fails alone (a new worker measures the rest); one still running at
    the end of the time box is stopped; the ones after it are reported as not measured, with the reason."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import run_benchmark
    from benchmarks.spec import PRESETS, RESULT_TAG

    (tmp_path / "worker.py").write_text(f"TAG = {RESULT_TAG!r}\n" + FAKE_WORKER)
    specs = [PRESETS["tiny"].replace(name=n) for n in ("a", "crash", "b", "hang", "c")]
    updates = []
    report = run_benchmark(
        specs,
        str(tmp_path / "worker.py"),
        ("jaxlora",),
        log=lambda _: None,
        keep_going=True,
        one_process=True,
        time_box=4,
        on_update=updates.append,
    )
    assert [run["spec"]["name"] for run in report["runs"]] == ["a", "b"]
    assert [(row["spec"]["name"], row["error"].splitlines()[-1]) for row in report["failed"]] == [
        ("crash", "the worker died")
    ]
    assert {row["spec"]["name"]: row["reason"] for row in report["skipped"]} == {
        "hang": "stopped at the end of the time box (4 s)",
        "c": "not measured: the time box of 4 s ran out",
    }
    assert len(updates) == 3 and [run["spec"]["name"] for run in updates[0]["runs"]] == ["a"]
