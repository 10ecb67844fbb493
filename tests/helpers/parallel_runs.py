"""Training runs in a subprocess with N CPU devices (tests/helpers/parallel_driver.py, many runs per JAX
start-up), on the stories260K Alpaca recipe cut to `STEPS` steps, and their results."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.recipes import set_dotted, stories_recipe

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "helpers" / "parallel_driver.py"
STEPS = 10


def _config(assets: Path, out: Path, **over) -> dict:
    cfg = stories_recipe(assets, out, "stories260k-alpaca.yaml", "alpaca_cleaned_1000.json")
    settings = {
        "data.seq_len": 128,
        "train.max_steps": STEPS,
        "train.warmup_ratio": None,  # the warmup these tolerances were set with: 10 steps, cut to the run
        "train.warmup_steps": 10,
        "train.eval_every_steps": STEPS,  # evaluates at 0 and at the end
        "train.eval_batches": 1,
        "checkpoint.every_steps": 5,
        "checkpoint.keep": 5,
        "logging.every_steps": 1,
        "logging.progress_bar": False,
        **over,
    }
    return set_dotted(cfg, settings)


def _env(devices: int) -> dict:
    """`devices` CPU devices in a subprocess (CPU even where a GPU is present)."""
    return dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )


def _results(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            d = json.loads(line[len("RESULT ") :])
            if "losses" in d:
                d["losses"] = {int(k): v for k, v in d["losses"].items()}
            out[d["name"]] = d
    return out


def _drive(runs: list, devices: int, spec_path: Path) -> dict:
    spec_path.write_text(json.dumps(runs))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec_path)],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _results(proc.stdout)
