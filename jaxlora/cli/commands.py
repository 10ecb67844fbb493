"""The `train` and `export` command lines, shared by `scripts/train.py`, `scripts/export.py` and the
`jaxlora` console script (`jaxlora.cli.main`). Each `main(argv)` returns the exit code; wrap it with
`jaxlora.cli.cli_main.cli_main` for one-line errors."""

import argparse
import sys

TRAIN_USAGE = """Fine-tune a Hugging Face model with LoRA.

    jaxlora train --config configs/X.yaml [section.key=value ...] [--resume]

Writes checkpoints, TensorBoard events, metrics.jsonl and the PEFT adapter under `output_dir`.
"""

EXPORT_USAGE = """Export a LoRA adapter as a PEFT adapter folder or as a merged Hugging Face checkpoint.

    jaxlora export --adapter DIR --model PATH_OR_ID --format peft|merged --out DIR
        [--dtype float32|bfloat16|float16] [--quant none|int8|nf4|mxfp4] [--quant-block-size N] [--overwrite]
    jaxlora export --run OUTPUT_DIR --format peft|merged --out DIR

`--run` exports a training run's latest checkpoint; `--model` and `--quant` then default to the run's.
"""


def train_args(argv=None):
    p = argparse.ArgumentParser(
        prog="train", description=TRAIN_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=3 output_dir=/tmp/run"
    )
    p.add_argument(
        "--resume", action="store_true", help="resume output_dir's latest checkpoint (fail if none)"
    )
    return p.parse_args(argv)


def train_main(argv=None) -> int:
    args = train_args(argv)
    from jaxlora.cli.signals import RECEIVED
    from jaxlora.config import load_config
    from jaxlora.models.saving import DiskFull, out_of_space
    from jaxlora.train import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, signals=RECEIVED)  # a signal swallowed in setup stops it
    except (TrainingDiverged, DiskFull) as err:
        return _failed(str(err))
    except OSError as err:  # a full disk anywhere else (metrics, config.yaml, the tokenizer beside adapter/)
        if not out_of_space(err):
            raise
        return _failed(f"disk full while writing {err.filename or 'a file'} ({err.strerror})")
    if result.interrupted:
        print(stop_line(result), file=sys.stderr)
        return 128 + result.interrupted
    if result.finished_before:
        print(f"{result.output_dir}: {FINISHED.format(step=result.step)}")
        return 0
    print(f"done: {result.step} steps; adapter in {result.output_dir / 'adapter'}")
    return 0


FINISHED = "already finished at step {step}; nothing to do (raise train.max_steps to go on)"


def stop_line(result) -> str:
    """What the train command says when a signal stopped the run (`TrainResult.interrupted`); the same
    words as `jaxlora.cli.cli_main` uses for a signal during setup ("interrupted by SIGINT")."""
    from jaxlora.train.loop import stop_words

    return (
        f"{stop_words(result.interrupted)} at step {result.step}; checkpoint saved and exported to "
        f"{result.output_dir / 'adapter'} (marked interrupted); rerun to resume"
    )


def _failed(message: str) -> int:
    """One error line and exit code 1 (a run or an export that failed for lack of space, or diverged)."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def export_args(argv=None):
    p = argparse.ArgumentParser(
        prog="export", description=EXPORT_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="PEFT LoRA adapter folder (adapter_config.json + safetensors)")
    src.add_argument("--run", help="training run output_dir: export its latest checkpoint")
    p.add_argument("--model", default=None, help="base model: HF hub id or local folder (default with --run)")
    p.add_argument("--format", required=True, choices=["peft", "merged"], help="what to write")
    p.add_argument("--out", required=True, help="output folder (must be empty or new unless --overwrite)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="merged weights dtype (default: the base checkpoint's)",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=["none", "int8", "nf4", "mxfp4"],
        help="merged: quantize the base as in training (QLoRA) and merge into the dequantized weights "
        "(default: none, or the run's quant.weights with --run)",
    )
    p.add_argument(
        "--quant-block-size", type=int, default=None, help="merged: the training's quant.block_size"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    return p.parse_args(argv)


def export_main(argv=None) -> int:
    args = export_args(argv)
    from jaxlora.cli.export import run_export
    from jaxlora.models.saving import DiskFull

    try:
        out = run_export(
            args.adapter,
            args.model,
            args.format,
            args.out,
            overwrite=args.overwrite,
            dtype=args.dtype,
            quant=args.quant,
            quant_block_size=args.quant_block_size,
            run=args.run,
        )
    except DiskFull as err:
        return _failed(str(err))
    print(f"wrote {args.format} export to {out}")
    return 0
