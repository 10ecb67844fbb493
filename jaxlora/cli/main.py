"""`jaxlora train|generate|export|plan|benchmark ...`: the console script (pyproject `[project.scripts]`).

Each subcommand runs the same function as its script in scripts/ (`jaxlora.cli.commands`,
`jaxlora.cli.generate`). `benchmark` needs the repository's benchmarks/ folder, so it runs
scripts/benchmark.py from a source checkout.
"""

import runpy
import sys
from pathlib import Path

from jaxlora.cli.cli_main import cli_main
from jaxlora.errors import UserError

USAGE = """usage: jaxlora COMMAND [ARGS ...]

commands:
  train      fine-tune with LoRA from a YAML config          (scripts/train.py)
  generate   generate text or chat, with an adapter or a run  (scripts/generate.py)
  export     write a PEFT adapter or a merged checkpoint      (scripts/export.py)
  plan       memory per device, from config.json alone       (scripts/plan.py)
  benchmark  speed against transformers + PEFT (source tree)  (scripts/benchmark.py)

`jaxlora COMMAND --help` describes each."""


def _benchmark(argv) -> int:
    script = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"
    if not script.is_file():
        raise UserError(
            "jaxlora benchmark needs a source checkout (scripts/ and benchmarks/); clone the repository"
        )
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def _commands() -> dict:
    from jaxlora.cli import commands, generate, plan

    return {
        "train": commands.train_main,
        "generate": generate.main,
        "export": commands.export_main,
        "plan": plan.plan_main,
        "benchmark": _benchmark,
    }


def run(argv=None) -> int:
    """Dispatch `argv` (default: sys.argv[1:]) to a subcommand; returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    commands = _commands()
    if argv[0] not in commands:
        raise UserError(f"unknown command {argv[0]!r}; use one of {', '.join(commands)} (jaxlora --help)")
    return commands[argv[0]](argv[1:])


main = cli_main(run)

if __name__ == "__main__":
    main()
