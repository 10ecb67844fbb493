"""GRPO end to end on CPU: configs/stories260k-grpo.yaml (the real stories260K Llama, its prompts and its
reward file) trained in-process; the mean reward rises, the metrics carry TRL's names, samples.jsonl holds
prompts, completions and rewards, a run killed with SIGKILL resumes to the same losses and rewards, the
adapter loads in PEFT, and a reward function that raises stops the run with one line after a checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jaxlora.config import config_from_dict
from jaxlora.train import train
from jaxlora.train.memory_plan import longest_seq_len, plan_memory
from jaxlora.train.rewards import RewardError
from tests.helpers.recipes import set_dotted

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "stories260k-grpo.yaml"
TRL_NAMES = (
    "reward", "reward_std", "rewards/happy_words/mean", "rewards/happy_words/std", "frac_reward_zero_std",
    "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "completions/mean_length", "completions/clipped_ratio",
)  # fmt: skip


def grpo_config(assets: Path, out: Path, **over) -> dict:
    """The recipe with absolute paths (model, prompts, reward file) and its run folder at `out`."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["output_dir"] = str(out)
    cfg["model"]["path"] = str(assets / "models" / "stories260K")
    cfg["data"]["train"][0]["path"] = str(ROOT / cfg["data"]["train"][0]["path"])
    cfg["grpo"]["reward_funcs"] = [str(ROOT / cfg["grpo"]["reward_funcs"][0])]
    cfg.setdefault("logging", {})["progress_bar"] = False
    return set_dotted(cfg, over)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def per_step(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(out) if key in r}


@pytest.fixture(scope="module")
def grpo_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    train(config_from_dict(grpo_config(assets, out)))
    return out


def test_mean_reward_rises(grpo_run):
    rewards = per_step(grpo_run, "train/reward")
    assert sorted(rewards) == list(range(1, 41))
    first, last = np.mean([rewards[s] for s in range(1, 11)]), np.mean([rewards[s] for s in range(31, 41)])
    evals = per_step(grpo_run, "eval/reward")
    print(f"train/reward steps 1-10 {first:.3f} -> 31-40 {last:.3f}; eval/reward {evals}")
    assert last > first + 0.2
    assert sorted(evals) == [0, 20, 40] and evals[40] > evals[0] + 0.2


def test_metrics_have_trl_names(grpo_run):
    step = next(r for r in records(grpo_run) if r["step"] == 1 and "train/loss" in r)
    missing = [n for n in TRL_NAMES if f"train/{n}" not in step]
    assert not missing, sorted(step)
    assert step["train/completions/mean_length"] == 24  # stories260K never samples EOS in 24 tokens
    assert step["train/completions/clipped_ratio"] == 1.0
    assert set(per_step(grpo_run, "eval/rewards/happy_words/mean")) == {0, 20, 40}


def test_samples_hold_prompts_completions_rewards(grpo_run):
    lines = [json.loads(x) for x in (grpo_run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in lines}) == [0, 20, 40] and len(lines) == 12
    prompts = {json.loads(x)["prompt"] for x in (ROOT / "configs/grpo/stories_prompts.jsonl").open()}
    for s in lines:
        assert s["prompt"] in prompts and s["completion"] and 0.0 <= s["reward"] <= 1.0


def test_kill_and_resume_continue_the_same_run(grpo_run, assets, tmp_path):
    """Killed after checkpoint 10, resumed: steps 11-14 have the uninterrupted run's losses and rewards
    (the rollouts' key comes from the run's key and the step; the prompt loader's position is saved)."""
    out, cfg_path = tmp_path / "run", tmp_path / "cfg.yaml"
    cfg = grpo_config(assets, out, **{"train.max_steps": 14, "train.eval_every_steps": None})
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "scripts/train.py", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((out / "metrics.jsonl").is_file() and max(per_step(out, "train/loss"), default=0) >= 11):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    train(config_from_dict(cfg), resume=True)
    assert [r["step"] for r in records(out) if "train/loss" in r].count(1) == 1  # resumed, not restarted
    for key in ("train/reward", "train/loss", "train/entropy"):
        ref, got = per_step(grpo_run, key), per_step(out, key)
        assert sorted(got) == list(range(1, 15))
        np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-5, atol=1e-7)


def test_adapter_loads_in_peft(grpo_run, stories_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 300]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, grpo_run / "adapter")
        after = tuned(ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-2  # the trained adapter acts


BOOM = """
CALLS = [0]


def boom(prompts, completions, **kwargs):
    CALLS[0] += 1
    if CALLS[0] > 3:  # from the 4th batch on, the rows of its last prompt raise
        return [1 / 0 if p == prompts[-1] else 0.0 for p in prompts]
    return [float(len(c)) for c in completions]
"""


def test_a_reward_that_raises_stops_after_a_checkpoint(assets, tmp_path):
    (tmp_path / "rewards.py").write_text(BOOM)
    boom = f"{tmp_path}/rewards.py:boom"
    over = {"train.max_steps": 10, "train.eval_every_steps": None, "grpo.reward_funcs": [boom]}
    out = tmp_path / "run"
    with pytest.raises(RewardError) as err:
        train(config_from_dict(grpo_config(assets, out, **over)))
    msg = str(err.value)
    assert "\n" not in msg and "reward function 'boom'" in msg and "ZeroDivisionError" in msg, msg
    assert "stories_prompts.jsonl (prompt" in msg and " on row " in msg, msg
    assert (out / "checkpoints" / "3").is_dir()  # steps 1-3 done, step 4's rewards failed


def test_prompt_rows_gsm8k_and_conversational(assets, stories_dir, tmp_path):
    """`format: prompt`: GSM8K's `question` as the prompt (left-truncated), its `answer` kept for the
    rewards (`jaxlora:exact_answer` scores the reference itself 1.0); message prompts get the chat
    template's generation prompt."""
    from transformers import AutoTokenizer

    from jaxlora.data.prompts import build_prompts
    from jaxlora.train.rewards import load_rewards, score

    tok = AutoTokenizer.from_pretrained(stories_dir)
    gsm = {"path": str(assets / "data" / "gsm8k_test.jsonl"), "format": "prompt", "max_samples": 6}
    gsm["fields"] = {"prompt": "question"}
    cfg = config_from_dict(grpo_config(assets, tmp_path / "o", **{"data.train": [gsm]}))
    train_p, val = build_prompts(cfg.data, tok, 0, max_prompt_length=16)
    assert len(train_p) + len(val) == 6 and set(train_p.columns) == {"answer"}
    rows = [json.loads(x) for x in (assets / "data" / "gsm8k_test.jsonl").open().readlines()[:6]]
    full = tok(rows[int(train_p.rows[0].split()[0])]["question"])["input_ids"]
    assert len(full) > 16 and train_p.ids[0] == full[-16:]  # the last 16 tokens
    answers = train_p.columns["answer"]
    got = score(load_rewards(["jaxlora:exact_answer"]), train_p.prompts, answers, [[1]] * len(answers),
                {"answer": answers})  # fmt: skip
    assert got[:, 0].tolist() == [1.0] * len(answers)

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "Tell a story."}], "n": 1}) + "\n")
    src = {"path": str(chat), "format": "prompt"}
    cfg = config_from_dict(
        grpo_config(assets, tmp_path / "p", **{"data.train": [src], "data.chat_template": "chatml"})
    )
    p, _ = build_prompts(cfg.data, tok, 0)
    text = tok.decode(p.ids[0])
    assert text.endswith("<|im_start|>assistant\n") and "Tell a story." in text, text
    assert p.prompts[0] == [{"role": "user", "content": "Tell a story."}] and p.columns == {"n": [1]}


REUSE = {"train.max_steps": 4, "train.eval_every_steps": None, "train.batch_size": 8,
         "train.grad_accum_steps": 2, "grpo.beta": 0.04, "grpo.num_iterations": 2}  # fmt: skip


@pytest.fixture(scope="module")
def reuse_run(assets, tmp_path_factory):
    """4 steps of 2 rollouts (num_iterations 2), with reference log-probs and accumulation, uninterrupted."""
    out = tmp_path_factory.mktemp("reuse") / "run"
    train(config_from_dict(grpo_config(assets, out, **REUSE)))
    return out


def test_reference_kl_reuse_and_accumulation(reuse_run):
    """beta > 0 (reference log-probs, `kl`), num_iterations 2 (one batch of answers serves two steps,
    ratios to the sampler's log-probs) and 2 accumulated micro-batches of 8 answers."""
    steps = {r["step"]: r for r in records(reuse_run) if "train/loss" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[1]["train/kl"] == 0.0  # the adapter starts at B = 0: the policy is the reference
    assert steps[2]["train/kl"] > 0.0 and steps[2]["train/clip_ratio/region_mean"] >= 0.0
    for a, b in ((1, 2), (3, 4)):  # the second step of each pair reuses the first one's answers
        assert steps[a]["train/reward"] == steps[b]["train/reward"]
    assert steps[1]["train/reward"] != steps[3]["train/reward"]
    assert abs(steps[1]["train/loss"]) < 1e-6 and abs(steps[2]["train/loss"]) > 1e-6  # ratio 1, then not


class Crash(Exception):
    pass


def test_resume_inside_a_rollout_reuses_its_batch(reuse_run, assets, tmp_path):
    """num_iterations 2, crashed during step 4 (after checkpoint 3, between the two steps of rollout 1),
    resumed: checkpoint 3 carries rollout 1's batch, so step 4 has the uninterrupted run's metrics and the
    final adapter is its adapter, bit for bit."""
    from safetensors.numpy import load_file

    def crash(step, _):
        if step == 4:
            raise Crash

    out = tmp_path / "run"
    cfg = config_from_dict(grpo_config(assets, out, **REUSE, **{"checkpoint.every_steps": 1}))
    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "3"]
    assert (ckpts / "3" / "carry").is_dir() and not (ckpts / "2" / "carry").exists()  # only inside a rollout
    train(cfg, resume=True)
    assert [r["step"] for r in records(out) if "train/loss" in r].count(1) == 1  # resumed, not restarted
    ref = {r["step"]: r for r in records(reuse_run) if "train/loss" in r}
    got = {r["step"]: r for r in records(out) if "train/loss" in r}  # step 4: the resumed run's
    keys = [k for k in ref[4] if k.startswith("train/")]
    assert "train/kl" in keys and "train/reward" in keys and "train/clip_ratio/region_mean" in keys
    for s in (1, 2, 3, 4):
        assert {k: got[s][k] for k in keys} == {k: ref[s][k] for k in keys}, s
    want, have = (
        load_file(reuse_run / "adapter" / "adapter_model.safetensors"),
        load_file(out / "adapter" / "adapter_model.safetensors"),
    )
    assert want.keys() == have.keys()
    for name in want:
        np.testing.assert_array_equal(have[name], want[name], err_msg=name)


def test_bad_grpo_setups_are_one_line(assets, tmp_path):
    from jaxlora.errors import UserError

    with pytest.raises(UserError, match="--max-seq-len searches data.seq_len; a grpo run's rows are"):
        longest_seq_len(config_from_dict(grpo_config(assets, tmp_path / "a")))
    sft = grpo_config(assets, tmp_path / "b", **{"train.objective": "sft", "train.max_steps": 1})
    with pytest.raises(UserError, match="format prompt holds prompts for train.objective grpo, not sft"):
        train(config_from_dict(sft))
    assert not (tmp_path / "b").exists()  # a failed setup leaves nothing behind
    alpaca = {"path": str(assets / "data" / "alpaca_100.json"), "format": "alpaca"}
    with pytest.raises(UserError, match="format alpaca has no prompts; GRPO needs format: prompt"):
        train(config_from_dict(grpo_config(assets, tmp_path / "c", **{"data.train": [alpaca]})))


def test_plan_counts_the_rollout_and_the_grpo_rows(assets, tmp_path):
    """`jaxlora plan` on a grpo run: the step compiled on [A, B, P + C] rows, and the rollout, whose temp
    holds at least its KV cache (k and v, [L, 2 prompts x G 8, P + C, K, H] each) and grows with C as the
    cache does; the peak is the larger program's, the rollout counted with the optimizer state."""
    from jaxlora.models import model_source

    def plan(completion: int) -> dict:
        over = {"grpo.max_prompt_length": 16, "grpo.max_completion_length": completion}
        return plan_memory(config_from_dict(grpo_config(assets, tmp_path / "a", **over)))

    report, longer = plan(24), plan(88)
    run, mem = report["run"], report["memory"]
    assert (run["seq_len"], run["prompt_len"], run["completion_len"]) == (16 + 24, 16, 24)
    step_peak = mem["arguments"] + mem["activations"] + mem["outputs"] - mem["aliased"]
    rollout = mem["rollout"]
    assert rollout["peak_with_optimizer"] == rollout["peak"] + mem["optimizer"]
    assert mem["peak"] == max(step_peak, rollout["peak_with_optimizer"])
    model = model_source(str(assets / "models" / "stories260K")).config
    per_slot = 2 * model.num_layers * 16 * model.num_kv_heads * model.head_dim * 4  # 16 rows, float32
    assert rollout["activations"] >= per_slot * (16 + 24)
    assert longer["memory"]["rollout"]["activations"] - rollout["activations"] >= per_slot * 64
    assert longer["run"]["seq_len"] == 16 + 88 and longer["memory"]["activations"] > mem["activations"]
