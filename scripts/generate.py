"""Generate text from a Hugging Face checkpoint (optionally with a LoRA adapter).

    python scripts/generate.py --model PATH_OR_ID --prompt TEXT [--format alpaca|chat|raw]
        [--adapter DIR_OR_RUN] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
        [--min-p P] [--repetition-penalty R] [--seed S]
    python scripts/generate.py --model PATH_OR_ID --chat [--chat-template chatml] < turns.txt

The same command as `jaxlora generate` (`jaxlora.cli.generate.main`); `--help` says more.
"""

from jaxlora.cli.cli_main import cli_main


@cli_main
def main() -> int:
    from jaxlora.cli.generate import main as generate_main

    return generate_main()


if __name__ == "__main__":
    main()
