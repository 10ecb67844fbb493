"""LoRA fine-tuning speed, jaxlora against transformers + PEFT on the same device (docs/performance.md).

    python scripts/benchmark.py --suite cpu --out benchmarks/results/cpu.json     # tiny + stories260k
    python scripts/benchmark.py --suite gpu --out benchmarks/results/h200.json    # 1B, 8B, 0.5B
    python scripts/benchmark.py --preset llama-3.2-1b --seq 8192 --attention cudnn --remat full
    python scripts/benchmark.py --preset stories260k --features --repeats 3       # each speed switch on/off
    python scripts/benchmark.py --preset llama-3.2-1b --features attention,remat --one-process --time-box 200

Each framework runs in its own subprocess; the table gives tokens/s, the median step time after warm-up
(and the process CPU time per step), peak memory (device, or host RSS on CPU), compile time, achieved
TFLOP/s and MFU against the best bf16 (and the compute dtype's) matmul peak measured in the same run.
`--features` measures jaxlora alone with one switch changed at a time against the preset's defaults:
model.attention with packed rows off and on, the remat policies and the other speed switches (a comma list
of groups picks some). Variants that cannot run here (cuDNN with packed rows, a GPU kernel on the CPU) or
repeat the default row are not run: the report lists them under "skipped" with the reason, and the ones
that fail under "failed". `--one-process` measures every variant in one process (faster: one start-up,
one model load; memory is then the compiled step's), `--time-box` stops starting variants in time.
The harness is benchmarks/ at the repository root: architectures as HF config.json files in
benchmarks/presets/, reports in benchmarks/results/.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # --time-box counts from here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` lives at the repository root, outside the package

from benchmarks.features import FEATURE_GROUPS, feature_specs, skip_reasons  # noqa: E402
from benchmarks.harness import format_table, run_benchmark, run_worker, run_worker_many  # noqa: E402
from benchmarks.spec import (  # noqa: E402
    ATTENTIONS,
    FRAMEWORKS,
    PRESETS,
    REMATS,
    RESULT_TAG,
    SUITES,
    BenchSpec,
)
from jaxlora.cli.cli_main import cli_main  # noqa: E402
from jaxlora.errors import UserError  # noqa: E402


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
    p.add_argument("--packed", action="store_true", help="jaxlora: rows of several packed examples")
    p.add_argument("--loss-chunk", type=int, help="jaxlora train.loss_chunk_size")
    p.add_argument("--no-scan", action="store_true", help="jaxlora: unroll the layers instead of lax.scan")
    p.add_argument("--no-donate", action="store_true", help="jaxlora: do not donate the state buffers")
    p.add_argument("--no-prefetch", action="store_true", help="jaxlora: pass host batches to the step")
    p.add_argument("--sync-every-step", action="store_true", help="read the loss on the host every step")
    p.add_argument("--threads", type=int, help="CPU: pin both frameworks to this many cores and threads")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement, interleaved")
    p.add_argument(
        "--features",
        nargs="?",
        const=",".join(FEATURE_GROUPS),
        metavar="GROUPS",
        help=f"jaxlora only: each speed switch on/off; groups (default all): {','.join(FEATURE_GROUPS)}",
    )
    p.add_argument("--one-process", action="store_true", help="jaxlora only: every spec in one process")
    p.add_argument(
        "--time-box", type=float, help="seconds from the start: start no measurement that would end later"
    )
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
    if args.packed:
        over["packed"] = True
    model_path = str(Path(args.assets) / "models" / "stories260K")
    return [PRESETS[n].replace(model_path=model_path, **over) for n in names]


@cli_main
def main() -> int:
    args = parse_args()
    if args.worker:
        framework, spec_json = args.worker
        job = json.loads(spec_json)
        if "specs" in job:  # several specs, one process: a tagged line for each event
            specs = [BenchSpec(**s) for s in job["specs"]]
            emit = lambda msg: print(RESULT_TAG + json.dumps(msg), flush=True)  # noqa: E731
            run_worker_many(framework, specs, job["deadline"], emit)
            return 0
        result = run_worker(framework, BenchSpec(**job))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    specs = build_specs(args)
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    skip: dict[str, str] = {}
    if args.features:
        # Only here: a worker process must not load JAX before its CPU affinity is set. This process
        # holds the GPU only to ask what can run: it must not take most of its memory up front.
        prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        import jax

        backend = jax.default_backend()
        if prealloc is None:
            del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
        else:
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = prealloc
        groups = tuple(g.strip() for g in args.features.split(",") if g.strip())
        specs = [v for s in specs for v in feature_specs(s, backend == "gpu", groups)]
        skip = skip_reasons(specs, backend)
        frameworks = ("jaxlora",)
    if any(s.packed for s in specs) and "peft" in frameworks:
        raise UserError("--packed is for jaxlora alone: pass --frameworks jaxlora")
    if args.one_process and frameworks != ("jaxlora",):
        raise UserError("--one-process is for jaxlora alone: pass --frameworks jaxlora (or --features)")
    command = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    specs_json = [dataclasses.asdict(s) for s in specs]

    def write(report: dict) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps(dict(report, command=command, specs=specs_json), indent=1) + "\n"
            )

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_benchmark(
        specs,
        str(Path(__file__).resolve()),
        frameworks,
        args.repeats,
        log,
        skip=skip,
        keep_going=bool(args.features),
        one_process=args.one_process,
        time_box=args.time_box,
        started=STARTED,
        on_update=write,
    )
    report.update(command=command, specs=specs_json)
    print(format_table(report))
    write(report)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    main()
