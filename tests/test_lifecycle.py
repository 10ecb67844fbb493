"""[polish 29] A run's life on the real stories260K model: the best checkpoint is the lowest eval loss,
Ctrl-C exports the checkpoint it saves (marked), a finished run is not run again, config.yaml writes the
warmup once, a full disk is one line, and what the export would refuse is refused before weights load.

One run serves items 1, 2, 3 and 9: stopped by a real SIGINT after step 2 (the loop saves step 3), then
resumed through the command line to step 6, then rerun twice (with and without --resume). Its
`early_stopping_min_delta` is larger than any change of the eval loss, so the best step differs from the
first only if `min_delta` no longer decides it.
"""

import contextlib
import copy
import io
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from jaxlora.config import config_from_dict, load_config
from jaxlora.train import train
from jaxlora.train.best import BestTracker
from jaxlora.train.checkpoint import newest_intact, restore_lora
from tests.helpers.recipes import set_dotted, tiny_config

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("examples/s", "it/s]", "s/it]", "Generating ", "tokenizing ", ":jaxlora.data:", "resuming ")


def _main(*argv) -> tuple[int, list[str], list[str]]:
    """`jaxlora ARGV` in-process (the console script's `main`): (exit code, stdout lines, stderr lines
    without progress bars, dataset reports and resume notes)."""
    from jaxlora.cli.main import main

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_argv, sys.argv = sys.argv, ["jaxlora", *map(str, argv)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
        for s, h in old.items():
            signal.signal(s, h)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
    return code, out.getvalue().splitlines(), lines


def _train(tmp: Path, cfg: dict, *args):
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _main("train", "--config", path, *args)


def _files(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _evals(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]


def _adapter(folder: Path) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of an adapter folder."""
    with safe_open(folder / "adapter_model.safetensors", "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _peft_of(lora: dict, cfg: dict, stories_dir: Path) -> dict:
    """A LoRA tree as the tensors of the PEFT file that jaxlora writes for it (run config `cfg`)."""
    from jaxlora.models.config import config_from_hf, read_hf_config
    from jaxlora.peft.adapter import _module_tensors, _ordered_paths

    model = config_from_hf(read_hf_config(stories_dir))
    return _module_tensors(model, lora, config_from_dict(cfg).lora, _ordered_paths(model, lora))


def test_best_is_the_lowest_eval_loss_and_min_delta_only_decides_when_to_stop():
    """Item 1, the issue's numbers: min_delta 0.5 and patience 2 stop at step 30, whose loss is the best."""
    best = BestTracker(patience=2, min_delta=0.5)
    assert best.update(10, 3.368) and not best.should_stop
    assert best.update(20, 3.189) and not best.should_stop  # the new best, though not 0.5 lower
    assert best.update(30, 3.086) and best.should_stop  # best again; 2 evaluations without progress
    assert (best.best_step, best.best_loss, best.bad_evals) == (30, 3.086, 2)
    again = BestTracker(patience=2, min_delta=0.5)
    again.load(best.state())  # as a resumed run reads it from a checkpoint
    assert again == best
    slow = BestTracker(patience=2, min_delta=0.5)  # progress is counted from the last real progress
    for step, loss in [(0, 3.0), (1, 2.7), (2, 2.4)]:
        slow.update(step, loss)
    assert (slow.best_step, slow.bad_evals, slow.should_stop) == (2, 0, False)  # 3.0 -> 2.4: progress


@pytest.fixture(scope="module")
def lifecycle(assets, tmp_path_factory):
    """(run folder, its config, the stopped run's `TrainResult`, ((adapter tensors, metadata), README.md)
    as the stop left them (None: no adapter/), the fixture's folder)."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    out = tmp / "run"
    cfg = tiny_config(assets, out, **{
        "data.validation_split": 0.05, "train.max_steps": 6, "train.eval_every_steps": 1,
        "train.eval_batches": 1, "train.learning_rate": 0.01, "train.warmup_ratio": 0.34,
        "train.eval_samples": 1, "train.sample_max_new_tokens": 4, "train.early_stopping_patience": 50,
        "train.early_stopping_min_delta": 10.0, "checkpoint.keep_best": True, "checkpoint.export": "best",
        "checkpoint.every_steps": 2, "checkpoint.keep": 5, "logging.tensorboard": True,
    })  # fmt: skip

    def ctrl_c(step, _metrics):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # a real signal, through the loop's own handler

    stopped = train(config_from_dict(cfg), on_step=ctrl_c)
    adapter = out / "adapter"  # before the resumed run rewrites it
    then = (_adapter(adapter), (adapter / "README.md").read_text()) if adapter.is_dir() else None
    return out, cfg, stopped, then, tmp


@pytest.fixture(scope="module")
def finished(lifecycle):
    """The stopped run resumed through the command line: (exit code, stdout lines, stderr lines)."""
    out, cfg, _, _, tmp = lifecycle
    return _train(tmp, cfg)


def test_ctrl_c_exports_the_checkpoint_it_saved_marked_interrupted(lifecycle, stories_dir):
    """Item 3: after Ctrl-C, adapter/ is the checkpoint the stop saved, and says it is from a stopped run."""
    out, cfg, stopped, then, _ = lifecycle
    assert (stopped.step, stopped.interrupted) == (3, signal.SIGINT)
    assert then is not None, "no adapter/ after the stop"
    (tensors, meta), readme = then
    lora, step = restore_lora(out / "checkpoints")  # the newest checkpoint: the one the stop saved
    assert step == 3
    want = _peft_of(lora, cfg, stories_dir)
    assert sorted(tensors) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    assert meta["jaxlora.step"] == "3" and meta["jaxlora.state"] == "interrupted by SIGINT at step 3"
    assert "interrupted by SIGINT at step 3" in readme and "not finished" in readme
    from jaxlora.cli.commands import stop_line

    line = stop_line(stopped)
    assert line.startswith("interrupted by SIGINT at step 3; checkpoint saved")
    assert f"{out / 'adapter'}" in line and "(marked interrupted)" in line


def test_best_checkpoint_is_the_lowest_eval_loss(lifecycle, finished, stories_dir):
    """Item 1 in a run: with min_delta above every change of the loss, best_checkpoint/ and adapter/ are
    still the step with the lowest eval loss (they were step 0)."""
    out = lifecycle[0]
    code, stdout, err = finished
    assert code == 0, err
    evals = dict(_evals(out))
    assert sorted(evals) == list(range(7))
    best = min(evals, key=evals.get)
    assert best != 0 and evals[best] < evals[0] - 0.1, evals  # a run whose best is not its first step
    assert [p.name for p in (out / "best_checkpoint").iterdir()] == [str(best)]
    assert f"adapter: {out / 'adapter'} (from the {'last' if best == 6 else 'best'} step, {best})" in stdout
    lora, _ = restore_lora(out / "best_checkpoint")
    tensors, meta = _adapter(out / "adapter")
    for k, v in _peft_of(lora, lifecycle[1], stories_dir).items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    assert meta["jaxlora.step"] == str(best) and meta["jaxlora.state"] == "finished at step 6"
    assert "interrupted" not in (out / "adapter" / "README.md").read_text()


def test_a_finished_run_is_not_run_again(lifecycle, finished):
    """Item 2: rerunning a finished run (with --resume, or without and the same config) says so in one
    line, exits 0, and appends and rewrites nothing (metrics, samples, TensorBoard, adapter)."""
    out, cfg, _, _, tmp = lifecycle
    assert finished[0] == 0
    before = _files(out)
    assert len(list((out / "tensorboard").iterdir())) == 2  # the stopped run's and the resumed run's
    for args in (["--resume"], []):
        code, stdout, err = _train(tmp, cfg, *args)
        assert code == 0 and err == [], err
        assert stdout == [
            f"{out}: already finished at step 6; nothing to do (raise train.max_steps to go on)"
        ]
        assert _files(out) == before


def test_config_yaml_writes_the_resolved_warmup_once(lifecycle, finished):
    """Item 9: config.yaml listed warmup_steps 10 and warmup_ratio 0.34; the ratio won (2 of 6 steps)."""
    out = lifecycle[0]
    text = (out / "config.yaml").read_text()
    lines = [ln.strip() for ln in text.splitlines() if "warmup" in ln.split(":")[0]]
    assert lines == ["warmup_ratio: 0.34  # warmup: 2 of the run's 6 steps (train.warmup_ratio)"], lines
    from jaxlora.config import TrainSection
    from jaxlora.train.optim import learning_rate_schedule

    schedule = learning_rate_schedule(TrainSection(max_steps=6, warmup_ratio=0.34, learning_rate=1.0), 6)
    assert float(schedule(1)) < 1.0 and float(schedule(2)) == pytest.approx(1.0)  # 2 steps of warmup
    saved = load_config(out / "config.yaml")
    assert saved.train.warmup_ratio == 0.34


# ----------------------------------------------------------------------------------------------------
# Item 11: a full disk


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process: a write past `nbytes` fails with EFBIG (Python ignores SIGXFSZ)."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# a command line run under RLIMIT_FSIZE (set in the child itself: no fork of this multithreaded process)
LIMITED = (
    "import resource as r, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "r.setrlimit(r.RLIMIT_FSIZE, (int(sys.argv[1]), r.getrlimit(r.RLIMIT_FSIZE)[1])); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(lifecycle, finished, tmp_path):
    """Item 11: orbax's write failing (here EFBIG at a 100 kB file size limit, as ENOSPC on a full disk)
    flooded tracebacks from its threads; now one line, exit 1, and the newest intact checkpoint stays."""
    src, cfg = lifecycle[0], lifecycle[1]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    over = ["train.max_steps=7", "train.eval_every_steps=null"]  # its last checkpoint: step 7
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, "100000", "scripts/train.py", "--config", path, *over],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
    assert proc.returncode == 1 and len(err) == 1, proc.stderr[-3000:]
    from jaxlora.models.saving import about_bytes

    checkpoints = out / "checkpoints"
    assert err[0] == (
        f"error: disk full while saving checkpoint step 7 to {checkpoints} (it needs about "
        f"{about_bytes(sum(p.stat().st_size for p in (checkpoints / '6').rglob('*') if p.is_file()))}); "
        f"the last intact checkpoint is step 6 ({checkpoints / '6'}): free some space (or move output_dir "
        "to a larger disk) and rerun to resume from it"
    )
    assert newest_intact(out / "checkpoints", set_aside=False) == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.isdigit()) == []


def test_a_full_disk_while_exporting_is_one_line(lifecycle, finished, tmp_path):
    """Item 11: the PEFT and the merged export of a run onto a full disk: one line, exit 1, no partial
    file."""
    run = lifecycle[0]
    for fmt, needs in (("peft", "the adapter"), ("merged", "the merged model")):
        out = tmp_path / fmt
        with _file_size_limit(100_000):
            code, _, err = _main("export", "--run", run, "--format", fmt, "--out", out)
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(
            f"error: disk full while writing {needs} of step 6 to {out} (it needs about "
        )
        assert not list(out.glob("*.safetensors*")), sorted(out.iterdir())


# ----------------------------------------------------------------------------------------------------
# Item 12: what the export would refuse at the end is refused at start-up, before weights load


def _weightless(src: Path, folder: Path) -> Path:
    """A model folder with config.json alone: loading its weights (or tokenizer) would fail."""
    folder.mkdir()
    shutil.copyfile(src / "config.json", folder / "config.json")
    return folder


def test_export_refusals_come_before_the_weights_load(assets, stories_dir, lifecycle, finished, tmp_path):
    """Item 12: each refusal on the way to adapter/ (LoRA layouts PEFT cannot express) came after loading
    the weights, or at the end of the run. Each run here has a model folder without weights or tokenizer:
    a refusal after loading would read them first, and fail otherwise."""
    from tests.helpers.hf_tiny import hf_config

    stories = _weightless(stories_dir, tmp_path / "stories")
    moe = tmp_path / "moe"
    hf_config("qwen3_moe").save_pretrained(moe)
    cases = [
        (stories, {"lora.layers_to_transform": [7]}, "has indices [7] outside the model's 5 layers"),
        (stories, {"lora.target_modules": ".*q_proj", "lora.layers_to_transform": [0]},
         "cannot be combined with a regex lora.target_modules"),
        (stories, {"lora.target_modules": r"model\.layers\.0\.self_attn\.q_proj|.*1\.mlp\.up_proj"},
         "selects different layers for different modules"),
        (stories, {"lora.target_modules": ["qkv"]}, "matches no linear layer of this llama model"),
        (stories, {"lora.target_parameters": ["mlp.experts.gate_up_proj"]}, "for mixture-of-experts models"),
        (moe, {"lora.target_parameters": ["mlp.experts.gate_up_proj"], "lora.dropout": 0.1},
         "cannot be combined with lora.dropout > 0"),
        (moe, {"lora.target_parameters": ["experts.w9"]}, "names no weight of this model"),
        (moe, {"lora.target_modules": ["gate_proj"]}, "names gate_proj without up_proj"),
    ]  # fmt: skip
    for model, over, needle in cases:
        out = tmp_path / "run"
        cfg = tiny_config(assets, out, **{"model.path": str(model), "data.seq_len": 32, **over})
        code, _, err = _train(tmp_path, cfg)
        assert code == 2 and len(err) == 1 and needle in err[0], (over, err)
        assert not out.exists()
    # a run resumed into a folder whose adapter/ is a file would be refused at its end, by the export
    out = tmp_path / "resumed"
    shutil.copytree(lifecycle[0], out)
    shutil.rmtree(out / "adapter")
    (out / "adapter").write_text("not a folder")
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(saved.replace(str(stories_dir), str(stories)))
    over = {"output_dir": str(out), "model.path": str(stories), "train.max_steps": 8}
    before = _files(out)
    code, _, err = _train(tmp_path, set_dotted(copy.deepcopy(lifecycle[1]), over))
    assert code == 2 and len(err) == 1, err
    assert f"{out / 'adapter'} is a file; the run writes its PEFT adapter there" in err[0], err
    assert _files(out) == before


def test_export_command_refusals_come_before_the_weights_load(lifecycle, finished, stories_dir, tmp_path):
    """Item 12, `jaxlora export --format merged`: a non-empty --out and an adapter made for another model
    (a plain or a multimodal one) were refused after the base model had been loaded."""
    from tests.helpers.hf_tiny import hf_config, make_hf_gemma3

    run = lifecycle[0]
    stories = _weightless(stories_dir, tmp_path / "stories")
    other = tmp_path / "llama"
    hf_config("llama").save_pretrained(other)
    gemma3 = tmp_path / "gemma3"
    make_hf_gemma3(gemma3)
    for weights in gemma3.glob("*.safetensors"):
        weights.unlink()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("keep")
    cases = [
        (["--adapter", run / "adapter", "--model", stories, "--out", taken], "is not empty"),
        (["--adapter", run / "adapter", "--model", other, "--out", tmp_path / "o1"], "has shape"),
        (["--run", run, "--model", gemma3, "--out", tmp_path / "o2"], "for this model with r="),
    ]  # fmt: skip
    for args, needle in cases:
        code, _, err = _main("export", "--format", "merged", *args)
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
