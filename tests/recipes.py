"""The stories260K recipes of configs/ as plain dicts pointed at the test assets, and dotted overrides."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
