"""Export a LoRA adapter as a PEFT adapter folder or as a merged Hugging Face checkpoint.

    python scripts/export.py --adapter DIR --model PATH_OR_ID --format peft|merged --out DIR
        [--dtype float32|bfloat16|float16] [--quant none|int8|nf4] [--quant-block-size N] [--overwrite]
    python scripts/export.py --run OUTPUT_DIR --format peft|merged --out DIR

`--format peft` re-saves the adapter in normalized PEFT form (checked against the model's dimensions);
`--format merged` folds it into the base weights and writes a checkpoint transformers loads directly
(with `--quant`, into the dequantized weights of the base quantized as in a QLoRA training run).
`--run OUTPUT_DIR` exports a training run's latest checkpoint instead of an adapter folder; `--model`
and `--quant` then default to the run's config. The same command as `jaxlora export`
(`jaxlora.cli.commands.export_main`).
"""

from jaxlora.cli.cli_main import cli_main


@cli_main
def main() -> int:
    from jaxlora.cli.commands import export_main

    return export_main()


if __name__ == "__main__":
    main()
