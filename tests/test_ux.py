"""[ux] What a run shows and keeps: the console summaries and eval lines, samples, the best checkpoint
(across kill -9 and resume), early stopping, W&B offline, and generate's formats and chat.

One run on the real stories260K model serves most assertions: started as a process (`jaxlora train`),
killed with SIGKILL after step 3, resumed in-process. Its learning rate is high enough that the eval loss
gets worse after step 0, so the best checkpoint (step 0) is only kept if the tracker's state survives the
kill.
"""

import contextlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxlora.config import config_from_dict
from jaxlora.train import train
from jaxlora.train.checkpoint import restore_lora
from tests.helpers.recipes import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _evals(out: Path) -> dict[int, float]:
    """eval/loss by step from metrics.jsonl (a step evaluated again after the kill has the same value)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


@pytest.fixture(scope="module")
def killed_run(assets, tmp_path_factory):
    """(run folder, the killed process's stdout, the resumed run's stdout)."""
    tmp = tmp_path_factory.mktemp("ux")
    out = tmp / "run"
    cfg = tiny_config(assets, out, **{
        "data.validation_split": 0.05, "train.max_steps": 6, "train.eval_every_steps": 1,
        "train.eval_batches": 1, "train.learning_rate": 0.05, "train.eval_samples": 2,
        "train.sample_max_new_tokens": 8, "checkpoint.keep_best": True, "checkpoint.export": "best",
        "checkpoint.keep": 1, "logging.tensorboard": True,
    })  # fmt: skip
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlora.cli", "train", "--config", str(path)],  # the `jaxlora` command
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    t0 = time.time()
    while not (out / "checkpoints" / "3" / "jaxlora_files.json").is_file():
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    first, _ = proc.communicate(timeout=60)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train(config_from_dict(cfg))
    return out, first, buf.getvalue()


def test_start_summary_counts_the_lora_tree(killed_run):
    out, first, resumed = killed_run
    match = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable \(([\d.]+)%\)", first)
    assert match, first
    total, trainable = (int(g.replace(",", "")) for g in match.groups()[:2])
    peft = load_file(out / "adapter" / "adapter_model.safetensors")
    assert trainable == sum(t.size for t in peft.values())
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert re.search(r"data: 886 examples, [\d,]+ tokens; \d+ reach data\.seq_len 256 \(truncated\)", first)
    assert "validation: 47 examples" in first
    assert "steps: 6 (" in first and "effective batch 2" in first and "model: " in first
    assert "resuming at step 3" in resumed


def test_eval_lines_and_end_summary(killed_run):
    out, first, resumed = killed_run
    evals = _evals(out)
    assert sorted(evals) == list(range(7))
    printed = {
        int(s): float(v) for s, v in re.findall(r"eval step (\d+): loss ([\d.]+), perplexity", resumed)
    }
    assert sorted(printed) == [4, 5, 6]  # the resumed run evaluates the steps after its checkpoint
    for step, loss in printed.items():
        assert loss == pytest.approx(evals[step], abs=1e-4)
    assert f"adapter: {out / 'adapter'} (from the best step, 0)" in resumed
    assert f"best checkpoint: step 0, eval loss {evals[0]:.4f}" in resumed
    assert f"curves: {out / 'metrics.jsonl'}, {out / 'tensorboard'}, {out / 'samples.jsonl'}" in resumed


def test_best_checkpoint_survives_kill_and_is_exported(killed_run, stories_dir):
    out, _, resumed = killed_run
    evals = _evals(out)
    best = min(evals, key=evals.get)
    after = {s: evals[s] for s in (4, 5, 6)}
    assert min(after, key=after.get) != best  # a tracker restarted at the resume would pick another step
    assert [p.name for p in (out / "best_checkpoint").iterdir()] == [str(best)]
    lora, step = restore_lora(out / "best_checkpoint")
    assert step == best
    from jaxlora.models.config import config_from_hf, read_hf_config
    from jaxlora.peft import load_peft_adapter

    exported, _ = load_peft_adapter(out / "adapter", config_from_hf(read_hf_config(stories_dir)))
    flat_a = {k: np.asarray(v) for k, v in _flat(lora).items()}
    flat_b = {k: np.asarray(v) for k, v in _flat(exported).items()}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_allclose(flat_b[k], flat_a[k], atol=1e-7, err_msg=k)
    last, _ = restore_lora(out / "checkpoints")
    assert any(not np.allclose(np.asarray(v), flat_a[k]) for k, v in _flat(last).items())


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def test_samples_jsonl_and_tensorboard_text(killed_run):
    out, _, resumed = killed_run
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(7))
    for step in (4, 5, 6):  # evaluated once (the kill happened after step 3)
        assert [r["index"] for r in by_step[step]] == [0, 1]
        assert all(r["prompt"].startswith("Below is an instruction") for r in by_step[step])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for events in sorted((out / "tensorboard").iterdir()):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("samples/"):
                for ev in acc.Tensors(tag):
                    texts[(tag, ev.step)] = ev.tensor_proto.string_val[0].decode()
    assert {t for t, _ in texts} == {"samples/0/text_summary", "samples/1/text_summary"}
    completion = by_step[6][1]["completion"]
    assert completion in texts[("samples/1/text_summary", 6)]


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """History rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of protobuf
    `Record`s after a 7-byte header, in 32 KiB blocks of records with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, rows = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def test_early_stopping_quiet_console_and_wandb_offline(assets, tmp_path, monkeypatch, capsys):
    """A learning rate of ~0 never improves the eval loss by min_delta: patience 2 stops at step 2."""
    import wandb  # noqa: F401  (the `wandb` extra; in the test extra too, so CI runs this)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = tiny_config(assets, out, **{
        "data.validation_split": 0.05, "train.max_steps": 20, "train.eval_every_steps": 1,
        "train.eval_batches": 1, "train.learning_rate": 1e-12, "train.eval_samples": 0,
        "train.early_stopping_patience": 2, "train.early_stopping_min_delta": 1e-3,
        "checkpoint.every_steps": 10, "logging.level": "warning", "logging.trackers": ["jsonl", "wandb"],
    })  # fmt: skip
    capsys.readouterr()
    result = train(config_from_dict(cfg))
    assert result.step == 2 and not result.interrupted
    assert json.loads((out / "run_state.json").read_text()) == {"step": 2, "finished": True}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert capsys.readouterr().out == ""  # logging.level warning: no summaries, no eval lines
    assert sorted(_evals(out)) == [0, 1, 2]
    jsonl: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        jsonl.setdefault(row.pop("step"), {}).update(row)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    assert sorted(history) == sorted(jsonl)
    for step, row in jsonl.items():
        assert history[step].keys() == row.keys()
        for k, v in row.items():
            assert history[step][k] == pytest.approx(v, rel=1e-6), (step, k)


# ----------------------------------------------------------------------------------------------------
# generate: --format, a run folder as --adapter, --chat

ALPACA_BY_HAND = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
)


def _generate(argv, capsys, monkeypatch, stdin=None) -> str:
    from jaxlora.cli.generate import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_generate_format_alpaca_matches_the_prompt_rendered_by_hand(
    killed_run, stories_dir, tmp_path, capsys, monkeypatch
):
    """The run's last checkpoint (a trained Alpaca adapter) exported, then as a run folder whose own
    format (alpaca) is the default: the answer is the completion of the hand-rendered prompt."""
    from jaxlora.cli.export import run_export

    out, _, _ = killed_run
    model = ["--model", str(stories_dir), "--max-new-tokens", "12"]
    last = run_export(None, None, "peft", str(tmp_path / "last"), run=str(out))
    raw = _generate([*model, "--adapter", str(last), "--prompt", ALPACA_BY_HAND], capsys, monkeypatch)
    answer = _generate([*model, "--adapter", str(last), "--format", "alpaca", "--prompt", "Name a color."],
                       capsys, monkeypatch)  # fmt: skip
    assert raw.startswith("Below is an instruction") and answer.strip()
    assert raw.strip().endswith(answer.strip())
    assert "### Response:" not in answer
    # a run folder: its adapter/ (the best step) with the run's format
    by_run = _generate([*model, "--adapter", str(out), "--prompt", "Name a color."], capsys, monkeypatch)
    adapter = ["--adapter", str(out / "adapter"), "--format", "raw"]
    best = _generate([*model, *adapter, "--prompt", ALPACA_BY_HAND], capsys, monkeypatch)
    assert best.strip().endswith(by_run.strip()) and by_run.strip()


def test_generate_chat_two_turns_through_the_template(stories_dir, capsys, monkeypatch):
    """Piped stdin, two lines: two answers, each the completion of the conversation rendered by hand with
    the chatml template (the second turn includes the first answer)."""
    model = ["--model", str(stories_dir), "--max-new-tokens", "8"]
    out = _generate(
        [*model, "--chat", "--chat-template", "chatml"], capsys, monkeypatch, "Hello\nWhat next?\n"
    )
    answers = [ln for ln in out.splitlines() if ln.strip()]
    assert len(answers) == 2, out
    first = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    second = f"{first}{answers[0]}<|im_end|>\n<|im_start|>user\nWhat next?<|im_end|>\n<|im_start|>assistant\n"
    for rendered, answer in zip((first, second), answers, strict=True):
        by_hand = _generate([*model, "--format", "raw", "--prompt", rendered], capsys, monkeypatch)
        assert by_hand.strip().endswith(answer.strip())


def test_generate_chat_in_a_pseudo_terminal(stories_dir):
    """`scripts/generate.py --chat` on a pty: a "> " prompt before each turn, two turns in, two answers out,
    then end of input (Ctrl-D) ends it with exit code 0."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "scripts/generate.py", "--model", str(stories_dir), "--chat", "--chat-template",
         "chatml", "--max-new-tokens", "6"],
        cwd=ROOT, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    seen = b""

    def read_until(n_prompts: int) -> None:
        nonlocal seen
        t0 = time.time()
        while seen.count(b"> ") < n_prompts:
            assert time.time() - t0 < 120, seen
            seen += os.read(master, 4096)

    read_until(1)
    os.write(master, b"Hello\n")
    read_until(2)
    os.write(master, b"What next?\n")
    read_until(3)
    os.write(master, b"\x04")  # end of input
    assert proc.wait(timeout=60) == 0
    os.close(master)
    lines = [ln for ln in seen.decode(errors="replace").replace("\r", "").split("\n") if ln.strip()]
    # the terminal echoes each turn after its prompt; each answer is a line of its own
    assert lines[0] == "> Hello" and lines[2] == "> What next?" and lines[1].strip() and lines[3].strip()


# ----------------------------------------------------------------------------------------------------
# The `jaxlora` command and plot_metrics.py


def test_jaxlora_command_dispatches_to_the_scripts_functions(capsys):
    import tomllib

    from jaxlora.cli import commands, generate
    from jaxlora.cli.main import _commands, run
    from jaxlora.errors import UserError

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["jaxlora"]
    assert target == "jaxlora.cli.main:main"
    assert _commands()["generate"] is generate.main and _commands()["train"] is commands.train_main
    assert run([]) == 2 and "train" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown command 'trian'"):
        run(["trian"])
    with pytest.raises(SystemExit) as done:
        run(["export", "--help"])
    assert done.value.code == 0 and "--run" in capsys.readouterr().out


def test_plot_metrics_draws_reward_margins_in_a_middle_panel(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")  # the `plot` extra
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": s, "train/loss": 0.7 - s / 20, "lr": 1e-3, "train/rewards/margins": s / 10} for s in (1, 2)
    ]
    rows += [{"step": 2, "eval/loss": 0.6, "eval/rewards/margins": 0.15, "eval/perplexity": 1.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "plot_metrics.py"))
    series = script["read_metrics"](run / "metrics.jsonl")
    assert script["middle_metrics"](series, None) == ["eval/rewards/margins", "train/rewards/margins"]
    assert script["middle_metrics"](series | {"train/rewards/margins": []}, ["eval/perplexity"]) == [
        "eval/perplexity"
    ]
    monkeypatch.setattr(sys, "argv", ["plot_metrics.py", str(run), "--metric", "eval/perplexity"])
    with pytest.raises(SystemExit) as done:
        script["main"]()
    assert done.value.code == 0 and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_bar_says_compiling_then_shows_loss_lr_speed_and_eta(assets, tmp_path, capsys, monkeypatch):
    import optax

    from jaxlora.train.progress import Progress
    from jaxlora.train.run_dir import RunDir

    monkeypatch.setattr("jaxlora.train.progress.on_terminal", lambda: True)  # the bar is for terminals

    cfg = config_from_dict(tiny_config(assets, tmp_path / "run", **{"logging.progress_bar": True}))
    (tmp_path / "run").mkdir()
    progress = Progress(cfg, RunDir(tmp_path / "run", False, True), optax.constant_schedule(1e-3), 10, 0)
    assert progress.bar.desc == "compiling"
    progress.compiled()
    assert progress.bar.desc == "train"
    progress.train(2, [{"loss": 2.5, "grad_norm": 1.0, "tokens": 100.0}] * 2)
    postfix = progress.bar.postfix
    assert (
        "loss=2.5000" in postfix
        and "lr=1.00e-03" in postfix
        and "tok_s=" in postfix
        and "eta=00:0" in postfix
    )
    progress.say("hello")
    progress.close()
    assert "hello" in capsys.readouterr().out
    quiet = config_from_dict(tiny_config(assets, tmp_path / "q", **{"logging.level": "warning"}))
    (tmp_path / "q").mkdir()
    progress = Progress(quiet, RunDir(tmp_path / "q", False, True), optax.constant_schedule(1e-3), 10, 0)
    progress.say("hello")
    progress.eval(0, {"eval/loss": 1.0})
    progress.close()
    assert capsys.readouterr().out == ""
