"""Fine-tune a Hugging Face model with LoRA.

    python scripts/train.py --config configs/X.yaml [section.key=value ...] [--resume]

Writes checkpoints, TensorBoard events, metrics.jsonl and the PEFT adapter under `output_dir`.
The same command as `jaxlora train` (`jaxlora.cli.commands.train_main`); `--help` says more.
"""

from jaxlora.cli.cli_main import cli_main


@cli_main
def main() -> int:
    from jaxlora.cli.commands import train_main

    return train_main()


if __name__ == "__main__":
    main()
