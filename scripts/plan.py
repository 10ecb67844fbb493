"""Plan a run's memory per device from its config and the model's config.json alone (no weights, no
tokenizer, no data).

    python scripts/plan.py --config configs/X.yaml [section.key=value ...] [--no-compile] [--memory-gib N]
        [--max-seq-len] [--json]

The same command as `jaxlora plan` (`jaxlora.cli.plan.plan_main`); `--help` says more.
"""

from jaxlora.cli.cli_main import cli_main


@cli_main
def main() -> int:
    from jaxlora.cli.plan import plan_main

    return plan_main()


if __name__ == "__main__":
    main()
