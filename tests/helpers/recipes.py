"""The stories260K recipes of configs/ as plain dicts pointed at the test assets, dotted overrides, and the
run configs the training tests share (`run_config`, `tiny_config`)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def stories_recipe(assets: Path, out: Path, recipe: str, data_file: str) -> dict:
    """configs/`recipe` with its model at the assets' stories260K, its first training source at
    assets/data/`data_file` and its run folder at `out`."""
    cfg = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    cfg["output_dir"] = str(out)
    cfg["model"]["path"] = str(assets / "models" / "stories260K")
    cfg["data"]["train"][0]["path"] = str(assets / "data" / data_file)
    return cfg


def set_dotted(cfg: dict, over: dict) -> dict:
    """Set every "section.key" of `over` in the nested dict `cfg` (missing sections are created); return
    `cfg`, changed in place."""
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def run_config(assets: Path, out: Path, **over) -> dict:
    """The stories260K Alpaca recipe of configs/, pointed at the assets and a temporary run folder."""
    cfg = stories_recipe(assets, out, "stories260k-alpaca.yaml", "alpaca_cleaned_1000.json")
    cfg["logging"]["progress_bar"] = False
    return set_dotted(cfg, over)


def tiny_config(assets: Path, out: Path, **over) -> dict:
    """The stories260K Alpaca recipe cut down to a few tiny steps."""
    cfg = stories_recipe(assets, out, "stories260k-alpaca.yaml", "alpaca_cleaned_1000.json")
    cfg["data"].update(seq_len=256, validation_split=0.0)
    cfg["train"].update(max_steps=2, batch_size=2, warmup_ratio=None, warmup_steps=1, eval_every_steps=None)
    cfg["checkpoint"] = {"every_steps": 1, "keep": 3}
    cfg["logging"] = {"every_steps": 1, "progress_bar": False, "tensorboard": False}
    return set_dotted(cfg, over)
