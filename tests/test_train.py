"""[train] end to end on the real stories260K model: loss falls, logs, exact resume, accumulation, PEFT."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxlora.config import DataConfig, DataSource, LoraConfig, TrainSection, config_from_dict
from jaxlora.data import BatchLoader, build_datasets
from jaxlora.lora import Adapter, init_lora, lora_scale
from jaxlora.models import load_model, load_tokenizer
from jaxlora.train import TrainingDiverged, train
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import BATCH_KEYS, StepSpec, make_train_step
from tests.helpers.recipes import run_config

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def alpaca_run(assets, tmp_path_factory):
    """One short fine-tune shared by several tests."""
    out = tmp_path_factory.mktemp("alpaca") / "run"
    cfg = run_config(
        assets,
        out,
        **{
            "train.max_steps": 60,
            "train.eval_every_steps": 30,
            "checkpoint.every_steps": 30,
            "logging.every_steps": 10,
        },
    )
    result = train(config_from_dict(cfg))
    return out, result


def test_alpaca_finetune_loss_falls(alpaca_run):
    _, result = alpaca_run
    before, after = result.eval_history[0][1], result.eval_history[-1][1]
    print(f"stories260K alpaca: eval loss before {before:.4f}, after {after:.4f} ({after / before:.3f}x)")
    assert result.eval_history[0][0] == 0 and after <= 0.8 * before


def test_tinyshakespeare_finetune_loss_falls(assets, tmp_path):
    cfg = run_config(
        assets,
        tmp_path / "run",
        **{
            "train.max_steps": 40,
            "train.eval_every_steps": 40,
            "train.eval_batches": 4,
            "checkpoint.every_steps": None,
        },
    )
    cfg["data"]["train"] = [{"path": str(assets / "data" / "tinyshakespeare.txt"), "format": "text"}]
    result = train(config_from_dict(cfg))
    before, after = result.eval_history[0][1], result.eval_history[-1][1]
    print(f"stories260K tinyshakespeare: eval loss {before:.4f} -> {after:.4f} ({after / before:.3f}x)")
    assert after <= 0.8 * before


def test_tensorboard_and_metrics_jsonl_agree(alpaca_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = alpaca_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "eval/loss", "eval/perplexity", "lr", "grad_norm", "tokens_per_sec", "step_time"}
    assert want <= tags, want - tags
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag in want:
        from_jsonl = [(d["step"], d[tag]) for d in lines if tag in d]
        from_tb = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in from_jsonl] == [s for s, _ in from_tb], tag
        np.testing.assert_allclose([v for _, v in from_tb], [v for _, v in from_jsonl], rtol=1e-6)
    assert (out / "config.yaml").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


def _losses(out: Path) -> dict[int, float]:
    """train/loss per step from metrics.jsonl (a resumed run's later line wins)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "train/loss" in d:
            losses[d["step"]] = d["train/loss"]
    return losses


def _resume_cfg(assets, out):
    return run_config(
        assets,
        out,
        **{
            "train.max_steps": 16,
            "train.eval_every_steps": None,
            "data.validation_split": 0.0,
            "checkpoint.every_steps": 4,
            "checkpoint.keep": 5,
            "logging.every_steps": 1,
        },
    )


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(config_from_dict(_resume_cfg(assets, out)))
    return _losses(out)


def _start(cfg_path: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "scripts/train.py", "--config", str(cfg_path), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, "SIGKILL-corrupt"])
def test_kill_and_resume_gives_same_losses(sig, assets, tmp_path, reference_run):
    """SIGKILL-corrupt: killed while writing checkpoint 8, which was left with a truncated and a missing
    file: the resume warns once, continues from checkpoint 4 and gives the same losses."""
    corrupt = sig == "SIGKILL-corrupt"
    sig = signal.SIGKILL if corrupt else sig
    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "cfg.yaml", _resume_cfg(assets, out))
    proc = _start(cfg_path)
    _wait_for_step(out, 9 if corrupt else 6, proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if corrupt:
        files = sorted(
            (p for p in (out / "checkpoints" / "8").rglob("*") if p.is_file()), key=os.path.getsize
        )
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
        next(p for p in files if p.parent.name == "d").unlink()
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        stopped = json.loads((out / "run_state.json").read_text())["step"]
        saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
        assert saved[-1] == stopped and stopped >= 6, (saved, stopped)
    else:
        assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(cfg_path), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    if corrupt:
        warned = [ln for ln in done.stderr.splitlines() if ln.startswith("warning: checkpoint")]
        assert len(warned) == 1 and "step 8" in warned[0] and "using step 4" in warned[0], done.stderr
        assert "Traceback" not in done.stderr
    resumed = _losses(out)
    assert sorted(resumed) == sorted(reference_run)
    diff = max(abs(resumed[s] - reference_run[s]) for s in reference_run)
    print(f"{signal.Signals(sig).name}: max loss difference after resume {diff:.2e}")
    assert diff <= 1e-6


def test_grad_accumulation_equals_large_batch(assets):
    """4 micro-batches of 2 rows equal one batch of 8 on padded variable-length rows."""
    model = load_model(assets / "models" / "stories260K")
    tok = load_tokenizer(model.path)
    src = DataSource(path=str(assets / "data" / "alpaca_100.json"), format="alpaca")
    data, _ = build_datasets(
        DataConfig(train=(src,), seq_len=512, truncation=True, validation_split=0.0), tok
    )
    loader = BatchLoader(data, 8, 512, packing=False, seed=0, prefetch=0)
    rows = next(loader)
    counts = (rows["targets"] != -100).sum(axis=1)
    assert len(set(counts.tolist())) > 1  # really variable length
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(model.config, lcfg, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-zero B so every gradient is non-trivial
    scale = jnp.asarray(lora_scale(model.config, lcfg))
    opt, _ = make_optimizer(TrainSection(max_steps=10, learning_rate=1e-2, warmup_steps=0), 10)
    step = jax.jit(make_train_step(StepSpec(model.config), opt))

    def run(accum):
        batch = {k: jnp.asarray(rows[k].reshape(accum, 8 // accum, -1)) for k in BATCH_KEYS}
        return step(Adapter.split(lora), opt.init(lora), model.params, batch, jax.random.key(0), scale)

    big, small = run(1), run(4)
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(big[0]), jax.tree.leaves(small[0]), strict=True)
    )
    print(
        f"accumulation 4x2 vs 8: loss {float(small[2]['loss']):.6f} vs {float(big[2]['loss']):.6f}, "
        f"max param diff {diff:.2e}"
    )
    assert abs(float(small[2]["loss"]) - float(big[2]["loss"])) < 1e-5 and diff < 1e-5
    assert abs(float(small[2]["grad_norm"]) - float(big[2]["grad_norm"])) < 1e-5


def test_adapter_generation_matches_peft(alpaca_run, assets):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = alpaca_run
    prompt = "Below is an instruction"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/generate.py",
            "--model",
            str(assets / "models" / "stories260K"),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "50",
            "--adapter",
            str(out / "adapter"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    tok = load_tokenizer(assets / "models" / "stories260K")
    base = AutoModelForCausalLM.from_pretrained(assets / "models" / "stories260K", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        gen = peft_model.generate(
            input_ids=ids, max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    text = tok.decode(gen[0], skip_special_tokens=True)
    assert proc.stdout.rstrip("\n") == text


def test_nan_guard_stops_with_step(assets, tmp_path):
    model_dir = tmp_path / "nan-model"
    model_dir.mkdir()
    src = assets / "models" / "stories260K"
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (model_dir / f.name).write_bytes(f.read_bytes())
    from jaxlora.models.safetensors_io import SafetensorsFile, write_safetensors

    st = SafetensorsFile(src / "model.safetensors")
    tensors = {n: np.array(st.get(n)) for n in st.names()}
    tensors["model.norm.weight"][:] = np.nan
    write_safetensors(model_dir / "model.safetensors", tensors)
    cfg = run_config(
        assets,
        tmp_path / "run",
        **{"train.max_steps": 5, "train.eval_every_steps": None, "logging.every_steps": 1},
    )
    cfg["model"]["path"] = str(model_dir)
    with pytest.raises(TrainingDiverged, match="NaN/Inf at step 1"):
        train(config_from_dict(cfg))


def _train_cli(tmp_path, cfg: dict, *overrides):
    path = write_config(tmp_path / "bad.yaml", cfg)
    return subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(path), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.batchsize=4", "did you mean 'train.batch_size'"),
        ("train.max_steps=ten", "train.max_steps"),
        ("data.train[0].path=/nonexistent/data.json", "/nonexistent/data.json"),
        ("model.path=/nonexistent/model", "/nonexistent/model"),
        ("data.seq_len=4096", "data.seq_len 4096 is above the model's maximum of 512"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.learning_rate=-1e-3", "train.learning_rate must be > 0"),
    ],
)
def test_bad_input_one_line_exit_2(override, needle, assets, tmp_path):
    proc = _train_cli(tmp_path, run_config(assets, tmp_path / "run"), override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_existing_output_dir_is_not_overwritten(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = _train_cli(tmp_path, run_config(assets, out))
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["precious.txt"]


def test_export_from_run_equals_final_adapter(alpaca_run, tmp_path):
    from safetensors.numpy import load_file

    out, _ = alpaca_run
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            "--run",
            str(out),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "a"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    exported = load_file(tmp_path / "a" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(exported[k], final[k])
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            "--run",
            str(empty),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "b"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2
        and "no config.yaml" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )
