"""Export a LoRA adapter as a PEFT adapter folder or as a merged Hugging Face checkpoint.

    python scripts/export.py --adapter DIR --model PATH_OR_ID --format peft|merged --out DIR
        [--dtype float32|bfloat16|float16] [--quant none|int8|nf4] [--quant-block-size N] [--overwrite]

`--format peft` re-saves the adapter in normalized PEFT form (checked against the model's dimensions);
`--format merged` folds it into the base weights and writes a checkpoint transformers loads directly
(with `--quant`, into the dequantized weights of the base quantized as in a QLoRA training run).
`--run OUTPUT_DIR` exports a training run's latest checkpoint instead of an adapter folder; `--model`
and `--quant` then default to the run's config.
"""

import argparse

from jaxlora.errors import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        choices=["none", "int8", "nf4"],
        help="merged: quantize the base as in training (QLoRA) and merge into the dequantized weights "
        "(default: none, or the run's quant.weights with --run)",
    )
    p.add_argument(
        "--quant-block-size", type=int, default=None, help="merged: the training's quant.block_size"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    return p.parse_args(argv)


@cli_main
def main() -> int:
    args = parse_args()
    from jaxlora.cli.export import run_export

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
    print(f"wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    main()
