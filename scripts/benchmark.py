"""LoRA fine-tuning speed, jaxlora against transformers + PEFT on the same device (docs/performance.md).

    python scripts/benchmark.py --suite cpu --out benchmarks/results/cpu.json     # tiny + stories260k
    python scripts/benchmark.py --suite gpu --out benchmarks/results/h200.json    # 1B, 8B, 0.5B
    python scripts/benchmark.py --preset llama-3.2-1b --seq 8192 --attention cudnn --remat full
    python scripts/benchmark.py --preset stories260k --features --repeats 3       # each speed switch on/off

Each framework runs in its own subprocess; the table gives tokens/s, the median step time after warm-up
(and the process CPU time per step), peak memory (device, or host RSS on CPU), compile time, achieved
TFLOP/s and MFU against the best bf16 (and the compute dtype's) matmul peak measured in the same run.
`--features` measures jaxlora alone with one switch changed at a time against the preset's defaults.
The harness is benchmarks/ at the repository root: architectures as HF config.json files in
benchmarks/presets/, reports in benchmarks/results/.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` lives at the repository root, outside the package

from benchmarks.harness import feature_specs, format_table, run_benchmark, run_worker  # noqa: E402
from benchmarks.spec import (  # noqa: E402
    ATTENTIONS,
    FRAMEWORKS,
    PRESETS,
    REMATS,
    RESULT_TAG,
    SUITES,
    BenchSpec,
)
from jaxlora.errors import cli_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "SPEC_JSON"), help=argparse.SUPPRESS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable")
    g.add_argument("--suite", choices=sorted(SUITES), help="a list of presets")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated: jaxlora,peft")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--quant", choices=["none", "int8", "nf4"])
    p.add_argument("--rank", type=int, help="LoRA r (alpha = 2r)")
    p.add_argument(
        "--remat", choices=REMATS, help="jaxlora train.remat; PEFT: gradient checkpointing for dots and full"
    )
    p.add_argument("--attention", choices=ATTENTIONS, help="jaxlora model.attention (PEFT: always sdpa)")
    p.add_argument("--loss-chunk", type=int, help="jaxlora train.loss_chunk_size")
    p.add_argument("--no-scan", action="store_true", help="jaxlora: unroll the layers instead of lax.scan")
    p.add_argument("--no-donate", action="store_true", help="jaxlora: do not donate the state buffers")
    p.add_argument("--no-prefetch", action="store_true", help="jaxlora: pass host batches to the step")
    p.add_argument("--sync-every-step", action="store_true", help="read the loss on the host every step")
    p.add_argument("--threads", type=int, help="CPU: pin both frameworks to this many cores and threads")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement, interleaved")
    p.add_argument("--features", action="store_true", help="jaxlora only: each speed switch on/off")
    p.add_argument(
        "--profile", default="", help="jaxlora: write a jax.profiler trace of the timed steps here"
    )
    p.add_argument(
        "--assets", default=os.environ.get("JAXLORA_ASSETS", str(ROOT.parent / "shared" / "assets"))
    )
    p.add_argument("--out", help="write the JSON report here")
    return p.parse_args(argv)


def build_specs(args) -> list:
    names = args.preset or SUITES[args.suite or "cpu"]
    over = {
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "quant": args.quant,
        "remat": args.remat,
        "attention": args.attention,
        "loss_chunk": args.loss_chunk,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "profile_dir": args.profile or None,
    }
    over = {k: v for k, v in over.items() if v is not None}
    if args.rank:
        over.update(r=args.rank, alpha=2.0 * args.rank)
    for flag, field in (("no_scan", "scan_layers"), ("no_donate", "donate"), ("no_prefetch", "prefetch")):
        if getattr(args, flag):
            over[field] = False
    if args.sync_every_step:
        over["sync_every_step"] = True
    model_path = str(Path(args.assets) / "models" / "stories260K")
    return [PRESETS[n].replace(model_path=model_path, **over) for n in names]


@cli_main
def main() -> int:
    args = parse_args()
    if args.worker:
        framework, spec_json = args.worker
        result = run_worker(framework, BenchSpec(**json.loads(spec_json)))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    specs = build_specs(args)
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    if args.features:
        import jax  # only here: a worker process must not load JAX before its CPU affinity is set

        specs = [v for s in specs for v in feature_specs(s, gpu=jax.default_backend() == "gpu")]
        frameworks = ("jaxlora",)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_benchmark(specs, str(Path(__file__).resolve()), frameworks, args.repeats, log)
    report["command"] = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    report["specs"] = [dataclasses.asdict(s) for s in specs]
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    main()
