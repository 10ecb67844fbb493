"""[gpu] `benchmarks/gpu_suite.sh --smoke`: the GPU suite's own code on CPU with tiny presets, so it cannot
rot between the sessions that have an H200 (about a minute on 2 cores)."""

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
    for step in ("pytest -m gpu", "benchmark tiny", "benchmark tiny-int8", "benchmark tiny-nf4"):
        assert f"== {step}: ok in" in suite, suite
    assert "backend cpu" in suite and "devices: cpu" in suite
    # (a) collected the gpu tests (collect only on CPU) without an import error
    collected = (tmp_path / "pytest.log").read_text()
    assert "tests/test_gpu.py::test_bf16_finetune_on_gpu_tracks_float32_on_cpu" in collected
    assert not re.search(r"\d+ errors?\b", collected), collected[-2000:]

    # (b) jaxlora against PEFT in the same run
    (run,) = json.loads((tmp_path / "smoke-tiny.json").read_text())["runs"]
    assert set(run["results"]) == {"jaxlora", "peft"} and run["speedup"] > 0
    for r in run["results"].values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and 0 < r["mfu_bf16_peak"] < 1
        assert np.isfinite(r["loss_last"])
    # (c) int8 and nf4, jaxlora only, merged into one report
    quant = json.loads((tmp_path / "smoke-tiny-quant.json").read_text())
    assert [s["quant"] for s in quant["specs"]] == ["int8", "nf4"]
    assert [r["spec"]["name"] for r in quant["runs"]] == ["tiny-int8", "tiny-nf4"]
    for r in (run["results"]["jaxlora"] for run in quant["runs"]):
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and np.isfinite(r["loss_last"])
    assert all(v > 0 for v in quant["peaks_flops"].values())
