"""The memory plan sweep: what each `train.remat` policy keeps, from the real step compiled abstractly.

    python benchmarks/remat_plan.py [--quick] [--out benchmarks/results/cpu-remat-plan.json]

Every figure is `jaxlora plan`'s (`jaxlora.train.memory_plan.Planner`): XLA's temp bytes ("activations")
and the peak of the Llama-3.1-8B LoRA train step (its real config.json, r16 all-linear, batch 1, bfloat16
compute, int8 base unless said), on this machine's backend. No weights are read and nothing runs.

- policies: temp at T = 2k, 8k and 32k for each policy; bytes per token from the slope between 8k and 32k;
  bytes per token per layer from the same step with 16 layers instead of 32 at T = 8k (what a policy keeps
  per layer, apart from the one layer being recomputed, which the slope also counts);
- growth: temp at T = 4k .. 32k for the default policy, Llama and a Gemma-2-9B config (sliding windows on
  every other layer, soft-capped attention logits), and the ratio per doubling;
- nf4: the peak with a 4-bit base at T = 2048;
- longest: whether the default and `offload` fit an 80 GB GPU (79.6 GiB) at 128k and 342k tokens.

`offload` off a GPU is planned as `minimal` less the layer inputs it keeps in host memory (the plan says
so in its notes); on a GPU (`benchmarks/gpu_suite.sh`) every figure is that GPU's own. Prints a table and
writes the JSON (with the command) to `--out` (`-`: standard output). `--quick`: the lean, full and offload
policies at T = 2k and 8k, the growth from 4k to 8k, and the longest lengths. `--gpu` (`gpu_suite.sh`'s
step (f), five compilations): the peak of lean, full and offload at 8k and of offload at 128k and 342k,
on `--model` (default the Llama-3.1-8B preset).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlora.config import load_config  # noqa: E402
from jaxlora.train.memory_plan import Planner  # noqa: E402

KB = 1024
GIB = 1 << 30
GPU_80GB = 79.6  # GiB an H100 80GB reports
POLICIES = ("none", "fast", "dots", "lean", "full", "offload")
LLAMA = ROOT / "benchmarks" / "presets" / "llama-3.1-8b"
GEMMA2 = ROOT / "benchmarks" / "presets" / "gemma-2-9b"
RECIPE = ROOT / "configs" / "llama-3.1-8b-int8.yaml"


def planner(model: Path, remat: str, quant: str = "int8", layers: int | None = None) -> Planner:
    """A Planner for the 8B recipe at batch 1 on `model`'s config.json (with `layers` layers if given)."""
    if layers is not None:
        folder = Path(tempfile.mkdtemp(prefix="jaxlora-plan-"))
        config = json.loads((model / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
        model = folder
    limit = json.loads((model / "config.json").read_text()).get("max_position_embeddings", 2048)
    over = [f"model.path={model}", "train.batch_size=1", "train.grad_accum_steps=1",
            f"data.seq_len={min(limit, 2048)}",
            f"train.remat={remat}", f"quant.weights={quant}", "parallel.strategy=single"]  # fmt: skip
    return Planner(load_config(RECIPE, over), None)


def temp(p: Planner, t: int) -> int:
    return p.report(t)["memory"]["activations"]


def policy_rows(lengths: list[int], policies=POLICIES) -> list[dict]:
    rows = []
    for remat in policies:
        p, half = planner(LLAMA, remat), planner(LLAMA, remat, layers=16)
        row = {"remat": remat, "temp": {t: temp(p, t) for t in lengths}}
        lo, hi = lengths[1], lengths[-1]
        row["bytes_per_token"] = (row["temp"][hi] - row["temp"][lo]) / (hi - lo) if hi > lo else None
        row["bytes_per_token_per_layer"] = (temp(p, lo) - temp(half, lo)) / (16 * lo)
        row["peak_2k"] = p.report(lengths[0])["memory"]["peak"]
        row["notes"] = p.report(lengths[0])["notes"]
        rows.append(row)
        print(f"{remat:8s} " + "  ".join(f"T={t}: {v / GIB:6.2f} GiB" for t, v in row["temp"].items())
              + f"  {row['bytes_per_token_per_layer'] / KB:6.1f} KiB/token/layer", flush=True)  # fmt: skip
    return rows


def growth(model: Path, lengths: list[int]) -> dict:
    p = planner(model, "lean")
    temps = {t: temp(p, t) for t in lengths}
    ratios = [temps[b] / temps[a] for a, b in zip(lengths, lengths[1:], strict=False)]
    print(f"growth {model.name}: " + ", ".join(f"{r:.2f}x" for r in ratios), flush=True)
    return {"temp": temps, "growth_per_doubling": ratios}


def longest(lengths: list[int]) -> list[dict]:
    out = []
    for remat in ("lean", "offload"):
        p = planner(LLAMA, remat)
        for t in lengths:
            peak = p.report(t)["memory"]["peak"]
            out.append({"remat": remat, "seq_len": t, "peak": peak, "fits_80gb": peak <= GPU_80GB * GIB})
            print(f"{remat:8s} T={t}: peak {peak / GIB:.1f} GiB, fits 80 GB: {peak <= GPU_80GB * GIB}")
    return out


def gpu_report(model: Path) -> dict:
    """The few plans the GPU suite has time for: each policy's temp and peak at 8k, offload's longest."""
    rows = []
    for remat, lengths in (("lean", [8192]), ("full", [8192]), ("offload", [8192, 131072, 344064])):
        p = planner(model, remat)
        for t in lengths:
            mem = p.report(t)["memory"]
            temp, peak = mem["activations"], mem["peak"]
            fits = peak <= GPU_80GB * GIB
            rows.append({"remat": remat, "seq_len": t, "temp": temp, "peak": peak, "fits_80gb": fits})
            print(f"{remat:8s} T={t}: temp {temp / GIB:.2f} GiB, peak {peak / GIB:.2f} GiB", flush=True)
    return {"plans": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 2k and 8k only")
    ap.add_argument("--gpu", action="store_true", help="the GPU suite's five plans")
    ap.add_argument("--model", default=str(LLAMA), help="a folder holding config.json (--gpu)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-remat-plan.json"))
    args = ap.parse_args()
    quick = args.quick
    if args.gpu:
        command = f"python benchmarks/remat_plan.py --gpu --model {args.model}"
        device = jax.local_devices()[0].device_kind
        report = {"command": command, "jax": jax.__version__, "device_kind": device}
        report.update(gpu_report(Path(args.model)))
        text = json.dumps(report, indent=1)
        print(text) if args.out == "-" else Path(args.out).write_text(text + "\n")
        return
    lengths = [2048, 8192] if quick else [2048, 8192, 32768]
    doubling = [4096, 8192] if quick else [4096, 8192, 16384, 32768]
    report = {
        "command": "python benchmarks/remat_plan.py" + (" --quick" if quick else ""),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.local_devices()[0].device_kind,
        "setup": "Llama-3.1-8B config.json, int8 base, LoRA r16 all-linear, batch 1, bfloat16 compute",
        "policies": policy_rows(lengths, ("lean", "full", "offload") if quick else POLICIES),
        "growth": {"llama-3.1-8b": growth(LLAMA, doubling), "gemma-2-9b": growth(GEMMA2, doubling)},
        "nf4_peak_2k": planner(LLAMA, "lean", quant="nf4").report(2048)["memory"]["peak"],
        "longest": longest([131072, 344064]),
    }
    print(f"nf4 base, lean, T=2048: peak {report['nf4_peak_2k'] / GIB:.2f} GiB")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    for folder in Path(tempfile.gettempdir()).glob("jaxlora-plan-*"):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
