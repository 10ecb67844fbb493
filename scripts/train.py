"""Fine-tune a Hugging Face model with LoRA.

    python scripts/train.py --config configs/X.yaml [section.key=value ...] [--resume]

Writes checkpoints, TensorBoard events, metrics.jsonl and the PEFT adapter under `output_dir`.
"""

import argparse
import sys

from jaxlora.errors import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=3 output_dir=/tmp/run"
    )
    p.add_argument(
        "--resume", action="store_true", help="resume output_dir's latest checkpoint (fail if none)"
    )
    return p.parse_args(argv)


@cli_main
def main() -> int:
    args = parse_args()
    from jaxlora.config import load_config
    from jaxlora.train import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(
            f"stopped by signal {result.interrupted} at step {result.step}; checkpoint saved", file=sys.stderr
        )
        return 128 + result.interrupted
    print(f"done: {result.step} steps; adapter in {result.output_dir / 'adapter'}")
    return 0


if __name__ == "__main__":
    main()
