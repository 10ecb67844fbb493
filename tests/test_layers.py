"""The package's dependency order (pyproject's import-linter contracts) holds: no module imports upward."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_holds():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout, out.stdout  # the package's layers, and those inside models/


def _layer_names(contract: dict) -> set[str]:
    return {name.strip() for layer in contract["layers"] for name in layer.split(":")}


def test_every_package_and_models_module_has_a_layer():
    """A new folder, root module or module of jaxlora/models/ is placed in the contracts, not left out of them
    (import-linter checks only the modules its layers name)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    package = next(c for c in contracts if "containers" not in c)
    models = next(c for c in contracts if c.get("containers") == ["jaxlora.models"])
    pkg = ROOT / "jaxlora"
    top = {f"jaxlora.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__"}
    top |= {f"jaxlora.{p.parent.name}" for p in pkg.glob("*/__init__.py")}
    inner = {p.stem for p in (pkg / "models").glob("*.py") if p.stem != "__init__"}
    inner |= {p.parent.name for p in (pkg / "models").glob("*/__init__.py")}
    assert top - _layer_names(package) == set(), "add them to the package contract in pyproject.toml"
    assert inner - _layer_names(models) == set(), "add them to the jaxlora.models contract in pyproject.toml"
