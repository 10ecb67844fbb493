"""Shared fixtures: where the real test assets live, and the GPU marker policy."""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("JAXLORA_ASSETS", ROOT.parent / "shared" / "assets")).resolve()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when no GPU is present; nothing else may be skipped."""
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.fail(f"test assets not found at {ASSETS}; set JAXLORA_ASSETS")
    return ASSETS


@pytest.fixture(scope="session")
def stories_dir(assets) -> Path:
    return assets / "models" / "stories260K"


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """family -> (folder, jaxlora Model) of a tiny random HF checkpoint (`hf_tiny.make_hf_model`), built
    once per session and shared by the PEFT tests."""
    from jaxlora.models import load_model
    from tests.helpers.hf_tiny import make_hf_model

    built: dict = {}

    def get(family):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"base_{family}")
            make_hf_model(family, folder)
            built[family] = (folder, load_model(folder))
        return built[family]

    return get


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if anything but a `gpu` test was skipped (CI must run everything else)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    bad = [r.nodeid for r in reporter.stats.get("skipped", []) if "gpu" not in r.keywords]
    if bad:
        reporter.write_line(f"FAIL: tests skipped that are not marked gpu: {bad}", red=True)
        session.exitstatus = 1
