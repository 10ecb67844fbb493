"""Plot a training run's loss curves (and learning rate) from its `metrics.jsonl` to a PNG.

    python scripts/plot_metrics.py RUN_DIR [--out PNG] [--title TEXT] [--metric NAME ...]

Needs matplotlib, which the base install lacks: `pip install 'jaxlora[plot]'` (or `pip install matplotlib`).

Top panel: the training loss and `eval/loss` against the optimizer step; middle panel: other metrics
(`--metric`, repeatable; default: the reward margins of a preference run, `train/...` and
`eval/rewards/margins`, else `eval/perplexity`); bottom panel: the learning rate `lr`. The training curve
is `train/loss_avg` (the mean over each logging interval) when the run logged it, drawn over the fainter
`train/loss` (the loss of the last step of each interval).
`--out` defaults to `RUN_DIR/loss.png`. A resumed run may log a step twice; the last value wins.
"""

import argparse
import json
import math
from pathlib import Path

import yaml

from jaxlora.cli.cli_main import cli_main
from jaxlora.errors import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's output_dir (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss.png)")
    p.add_argument("--title", default=None, help="figure title (default: run folder, model and LoRA rank)")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="a metrics.jsonl name for the middle panel; repeatable",
    )
    return p.parse_args(argv)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...] sorted by step} from a metrics.jsonl file; later lines win."""
    series: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: line {n} is not a metrics record with a step ({err})") from None
        for name, value in row.items():
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in series.items()}


def _label(name: str, values) -> str:
    return f"{name} (last {values[-1]:.3f})"


def default_title(run: Path) -> str:
    """The run folder's name, with the model and LoRA rank from its saved config.yaml when present."""
    title = run.resolve().name
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        return f"{title}: {Path(cfg['model']['path']).name}, LoRA r={cfg['lora']['r']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return title


def middle_metrics(series: dict, wanted: list[str] | None) -> list[str]:
    """The names drawn in the middle panel: `wanted` (each must exist), else the reward margins of a
    preference run, else eval/perplexity (empty: no middle panel)."""
    if wanted:
        missing = [m for m in wanted if m not in series]
        if missing:
            raise UserError(
                f"--metric {missing[0]} is not in metrics.jsonl; it has {', '.join(sorted(series))}"
            )
        return list(wanted)
    margins = sorted(k for k in series if k.endswith("rewards/margins"))
    return margins or [k for k in ("eval/perplexity",) if k in series]


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str, middle: list[str] = ()) -> None:
    """Write the figure (losses on top, `middle` metrics if any, learning rate below) to `out`."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "plot_metrics.py needs matplotlib: pip install 'jaxlora[plot]' (or pip install matplotlib)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [3, 2, 1] if middle else [3, 1]
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(8, 6 + 2 * bool(middle)), sharex=True,
        gridspec_kw={"height_ratios": ratios}, constrained_layout=True,
    )  # fmt: skip
    ax_loss, ax_lr = axes[0], axes[-1]
    if middle:
        for i, name in enumerate(middle):
            steps, values = zip(*series[name], strict=True)
            axes[1].plot(
                steps, values, color=f"C{3 + i}", marker="o", markersize=3, label=_label(name, values)
            )
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    if "train/loss_avg" in series:  # the mean over each logging interval: the readable training curve
        steps, values = zip(*series["train/loss"], strict=True) if "train/loss" in series else ((), ())
        ax_loss.plot(
            steps, values, color="C0", alpha=0.35, lw=0.8, marker=".", label="train/loss (last step)"
        )
        steps, values = zip(*series["train/loss_avg"], strict=True)
        ax_loss.plot(
            steps, values, color="C0", marker="o", markersize=3, label=_label("train/loss_avg", values)
        )
    elif "train/loss" in series:
        steps, values = zip(*series["train/loss"], strict=True)
        ax_loss.plot(steps, values, color="C0", marker="o", markersize=3, label=_label("train/loss", values))
    if "eval/loss" in series:
        steps, values = zip(*series["eval/loss"], strict=True)
        ax_loss.plot(
            steps, values, color="C1", ls="--", marker="s", markersize=5, label=_label("eval/loss", values)
        )
    ax_loss.set_ylabel("loss (mean next-token NLL, nats)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if "lr" in series:
        steps, values = zip(*series["lr"], strict=True)
        ax_lr.plot(steps, values, color="C2", marker="o", markersize=3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


@cli_main
def main() -> int:
    args = parse_args()
    run = Path(args.run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run}: give a training run's output_dir")
    series = read_metrics(path)
    if not {"train/loss", "train/loss_avg", "eval/loss"} & set(series):
        raise UserError(f"{path} has no train/loss or eval/loss values to plot")
    out = Path(args.out) if args.out else run / "loss.png"
    plot(series, out, args.title or default_title(run), middle_metrics(series, args.metric))
    summary = ", ".join(
        f"{k} {v[-1][1]:.4f} at step {v[-1][0]}" for k, v in series.items() if k.endswith("/loss")
    )
    print(f"wrote {out} ({summary})")
    return 0


if __name__ == "__main__":
    main()
