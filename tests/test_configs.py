"""Every recipe in configs/ parses through `load_config` (validation only: nothing is downloaded)."""

from pathlib import Path

import pytest

from jaxlora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {
        "gemma-3-1b-it-sharegpt.yaml",
        "phi-4-mini-instruct-alpaca.yaml",
        "smollm3-3b-sharegpt.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train
