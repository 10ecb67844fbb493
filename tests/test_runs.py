"""[runs] Trustworthy runs on the real stories260K model: run-folder rules, config changes on resume,
corrupt checkpoints and weight files, interrupts and start-up checks.

Each test reproduces one problem of the issue, then shows one `error:` line and exit code 2 (130/143 for
signals), no traceback, every file that was there byte-identical, and that the corrected rerun works.
The CLI runs in-process (`scripts/train.py`'s `main`) except where a signal must be observed.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxlora.config import config_from_dict, save_config
from jaxlora.train import train
from tests.helpers.recipes import tiny_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


def cli(tmp: Path, cfg: dict, *args, capsys) -> tuple[int, list[str]]:
    """Run `scripts/train.py --config` in-process: (exit code, the error lines on stderr)."""
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    old_argv = sys.argv
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = ["train.py", "--config", str(path), *args]
    capsys.readouterr()
    try:
        train_script.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
        for s, h in old.items():
            signal.signal(s, h)
    return code, error_lines(capsys.readouterr().err)


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (datasets' and tqdm's) and dataset-report log lines."""
    bars = (
        "examples/s",
        "it/s]",
        "s/it]",
        "Generating ",
        "tokenizing ",
        "Saving the dataset",
        ":jaxlora.data:",
    )
    return [ln for ln in stderr.splitlines() if ln.strip() and not any(b in ln for b in bars)]


def snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def assert_one_error(code: int, lines: list[str], needle: str, exit_code: int = 2):
    assert code == exit_code, lines
    assert len(lines) == 1 and needle in lines[0], lines
    assert "Traceback" not in lines[0]


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """Problem 2's corrected rerun, shared: a folder that a failed setup left behind (config.yaml and an
    empty metrics.jsonl, as older versions did) trains without overwrite. Two steps, checkpoints 1 and 2."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    cfg = tiny_config(assets, out)
    out.mkdir()
    save_config(config_from_dict(cfg), out / "config.yaml")
    (out / "metrics.jsonl").write_text("")
    result = train(config_from_dict(cfg))
    return out, cfg, result


def test_failed_setup_leaves_nothing_that_blocks_the_rerun(assets, tmp_path, trained, capsys):
    """Problem 2: bad data, a corrupt model or Ctrl-C during setup left config.yaml behind and the
    corrected rerun was refused."""
    out = tmp_path / "run"
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": \n')
    cfg = tiny_config(assets, out, **{"data.train": [{"path": str(bad_data), "format": "alpaca"}]})
    before = snapshot(tmp_path)
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, f"{bad_data}, line 2: invalid JSON")
    assert not out.exists() and snapshot(tmp_path) == {**before, tmp_path / "cfg.yaml": ANY_BYTES}
    code, lines = cli(tmp_path, cfg, "--resume", capsys=capsys)
    assert_one_error(code, lines, "nothing to resume")
    # the rerun of a folder holding a failed setup's files: `trained` (it refused before)
    run, _, result = trained
    assert result.step == 2 and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / ".jaxlora.lock").exists()


class _Any(bytes):
    def __eq__(self, other):
        return True

    __hash__ = bytes.__hash__


ANY_BYTES = _Any()


def test_config_changes_on_resume(assets, tmp_path, trained, capsys):
    """Problem 3: another lora.r, data or learning rate silently resumed (or crashed in orbax) after
    config.yaml had been overwritten."""
    src, cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = snapshot(out)
    data = tmp_path / "other.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!"}] * 8))
    for over, needle in [
        ({"lora.r": 4}, "lora.r 8 -> 4"),
        ({"train.learning_rate": 1e-3}, "train.learning_rate 0.003 -> 0.001"),
        ({"data.train": [{"path": str(data), "format": "alpaca"}]}, "data.train"),
    ]:
        code, lines = cli(tmp_path, tiny_config(assets, out, **over), capsys=capsys)
        assert_one_error(code, lines, needle)
        assert "overwrite=true" in lines[0]
        assert snapshot(out) == before
    # compatible: a longer run resumes from step 2 with one line saying so
    code, lines = cli(tmp_path, tiny_config(assets, out, **{"train.max_steps": 3}), capsys=capsys)
    assert code == 0, lines
    note = "(the learning-rate decay is stretched over the new length)"
    assert [ln for ln in lines if ln.startswith("resuming")] == [
        f"resuming {out} with train.max_steps 2 -> 3 {note}"
    ]
    assert json.loads((out / "run_state.json").read_text()) == {"step": 3, "finished": True}
    # overwrite: true starts afresh with the new shape
    code, lines = cli(tmp_path, tiny_config(assets, out, **{"lora.r": 4, "overwrite": True}), capsys=capsys)
    assert code == 0, lines
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["r"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_corrupt_latest_checkpoint_falls_back(assets, tmp_path, trained, capsys):
    """Problem 4: a truncated or missing file in the latest checkpoint flooded tracebacks."""
    src, cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    chunk = max((out / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:10])
    code, lines = cli(tmp_path, tiny_config(assets, out, **{"train.max_steps": 3}), capsys=capsys)
    assert code == 0, lines
    warnings = [ln for ln in lines if not ln.startswith("resuming")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: checkpoint step 2 in {out / 'checkpoints'}"
    )
    assert "using step 1; moved to 2.corrupt" in warnings[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["1", "2", "2.corrupt", "3"], names
    # none intact: one error line, nothing changed
    for step in ("1", "2", "3"):
        (out / "checkpoints" / step / "meta" / "metadata").unlink()
    before = snapshot(out)
    code, lines = cli(tmp_path, tiny_config(assets, out, **{"train.max_steps": 4}), capsys=capsys)
    assert_one_error(code, lines, "no intact checkpoint in")
    assert snapshot(out) == before


def test_corrupt_weight_files_name_file_and_tensor(assets, stories_dir, tmp_path, capsys):
    """Problem 5: a truncated model.safetensors gave a raw ValueError, a garbage header MemoryError."""
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    out = tmp_path / "run"
    cfg = tiny_config(assets, out, **{"model.path": str(model)})
    weights.write_bytes(good[: len(good) // 2])
    before = snapshot(model)
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, f"{weights}: tensor ")
    assert "truncated" in lines[0] and snapshot(model) == before and not out.exists()
    weights.write_bytes((2**60).to_bytes(8, "little") + b"{garbage")
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, f"{weights}: not a valid safetensors file (its header claims")
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    blob = json.dumps(header).encode()
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob + good[8 + header_len :])
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, f"tensor {name}: ")
    assert not out.exists()


def test_start_up_checks(assets, stories_dir, tmp_path, capsys):
    """Problem 7: a too-large tokenizer showed up as NaN at step 1, a folder without tokenizer files as
    "install sentencepiece", an output_dir that is a file or in /proc as a traceback, and a warmup longer
    than the run was clamped silently."""
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    out = tmp_path / "run"
    cfg = tiny_config(assets, out, **{"model.path": str(model)})
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "vocab_size": 300}))
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, "has 512 tokens but the model's vocabulary (vocab_size in")
    (model / "config.json").write_text(json.dumps(conf))
    for f in ("tokenizer.json", "tokenizer.model"):
        (model / f).unlink()
    code, lines = cli(tmp_path, cfg, capsys=capsys)
    assert_one_error(code, lines, f"model.path {model} has no tokenizer files (none of tokenizer.json")
    assert not out.exists()
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    for target, needle in [
        (afile, "is a file, not a folder"),
        (Path("/proc/jaxlora-run"), "cannot be created"),
    ]:
        code, lines = cli(tmp_path, tiny_config(assets, target), capsys=capsys)
        assert_one_error(code, lines, f"output_dir {target}")
        assert needle in lines[0]
    assert afile.read_text() == "keep"
    from jaxlora.config import TrainSection
    from jaxlora.train.checks import check_schedule

    # A warmup set longer than the run was cut to its length without a word: now one line, exit 2.
    over = {"train.warmup_ratio": None, "train.warmup_steps": 10}
    code, lines = cli(tmp_path, tiny_config(assets, tmp_path / "warm", **over), capsys=capsys)
    assert_one_error(code, lines, "train.warmup_steps 10 is more than the run's 2 steps")
    assert "train.warmup_ratio" in lines[0]
    assert not (tmp_path / "warm").exists()
    capsys.readouterr()
    check_schedule(TrainSection(max_steps=5), 5)  # the default 10, not set: cut, with a warning
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 1 and "default train.warmup_steps 10 is more than the run's 5 steps" in warned[0]
    check_schedule(TrainSection(max_steps=5, warmup_ratio=0.5), 5)
    check_schedule(TrainSection(max_steps=50, warmup_steps=10), 50)
    assert capsys.readouterr().err == ""


def _start(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "scripts/train.py", "--config", str(cfg_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_interrupts_exit_130_143_with_one_line(assets, tmp_path, capsys):
    """Problem 6: Ctrl-C during setup gave a traceback, and once (in the first eval compile) it was
    swallowed and the run trained to the end with exit 0."""
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(assets, out)))
    proc = _start(cfg_path)  # SIGINT while importing
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert error_lines(err) == ["interrupted by SIGINT; stopped"], err
    proc = _start(cfg_path)  # SIGTERM once the folder is claimed, during setup
    t0 = time.time()
    while not (out / ".jaxlora.lock").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stop = f"checkpoint saved and exported to {out / 'adapter'} (marked interrupted); rerun to resume"
    assert error_lines(err) in (
        ["interrupted by SIGTERM; stopped"],
        [f"interrupted by SIGTERM at step 0; {stop}"],
    ), err
    assert not (out / ".jaxlora.lock").exists()
    # a signal whose exception was swallowed (here: recorded, never raised) still stops the loop, at once,
    # with a checkpoint, and the rerun resumes from it
    from jaxlora.cli.signals import RECEIVED

    RECEIVED.signum = signal.SIGINT
    try:
        code, lines = cli(tmp_path, tiny_config(assets, out, **{"train.max_steps": 3}), capsys=capsys)
    finally:
        handled, RECEIVED.signum = RECEIVED.signum, 0
    assert code == 130 and handled == 0, lines  # the loop cleared the record: it returned the signal
    assert lines == [f"interrupted by SIGINT at step 0; {stop}"]  # at once: no step taken
    result = train(config_from_dict(tiny_config(assets, out, **{"train.max_steps": 3})))
    assert result.step == 3 and not result.interrupted


def test_no_pytorch_banner_in_our_commands(assets, stories_dir, tmp_path):
    """Polish: without PyTorch, transformers printed "PyTorch was not found" in front of our output."""
    (tmp_path / "sitecustomize.py").write_text(
        'import sys\nsys.modules["torch"] = None  # as if not installed\n'
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    plain = subprocess.run(
        [sys.executable, "-c", "import transformers"], env=env, capture_output=True, text=True
    )
    assert "PyTorch was not found" in plain.stderr  # the banner, reproduced
    model = tmp_path / "model"  # a model whose tokenizer is too large: fails after transformers loads
    shutil.copytree(stories_dir, model)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "vocab_size": 300}))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(assets, tmp_path / "run", **{"model.path": str(model)})))
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(cfg_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "has 512 tokens but the model's vocabulary" in lines[0], proc.stderr
