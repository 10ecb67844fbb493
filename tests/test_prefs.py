"""[prefs] DPO and ORPO: pair data (TRL standard/conversational, ShareGPT ranking), tokenization, losses
and metrics against TRL 1.16's real `DPOTrainer` and `ORPOTrainer` on the PyTorch model with the real PEFT
adapter, a DPO run on stories260K, exact resume after kill -9, accumulation, and bad input."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from jaxlora.config import config_from_dict
from jaxlora.data import PAIR_KEYS, PairLoader, build_pairs
from jaxlora.data.config import DataConfig
from jaxlora.data.templates import resolve_chat_template
from jaxlora.errors import UserError
from jaxlora.lora import lora_scale
from jaxlora.models import load_model, load_tokenizer
from jaxlora.train import train
from jaxlora.train.checkpoint import restore_lora
from jaxlora.train.prefs import Preference, PrefSpec, dpo_loss
from jaxlora.train.step import StepSpec, make_eval_step
from tests.helpers.recipes import set_dotted, stories_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def dpo_config(assets: Path, out: Path, **over) -> dict:
    """configs/stories260k-dpo.yaml pointed at the assets, shortened for the tests."""
    cfg = stories_recipe(assets, out, "stories260k-dpo.yaml", "llamafactory_dpo_en_demo.json")
    del cfg["data"]["train"][0]["max_samples"], cfg["data"]["validation"]  # all 300 pairs, 12 held out
    cfg["data"].update(seq_len=128, validation_split=0.04)
    cfg["prefs"]["max_prompt_length"] = 64
    cfg["train"].update(learning_rate=2e-3, eval_batches=2, eval_samples=0, max_steps=STEPS)
    cfg["logging"].update(progress_bar=False, every_steps=1, level="warning")
    return set_dotted(cfg, over)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _records(out) if "train/loss" in r}


@pytest.fixture(scope="module")
def dpo_run(assets, tmp_path_factory):
    """One DPO run shared by the tests below."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = dpo_config(assets, out)
    train(config_from_dict(cfg))
    return out, cfg


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir)


def test_dpo_run_learns_the_preferences(dpo_run):
    out, _ = dpo_run
    evals = {r["step"]: r for r in _records(out) if "eval/loss" in r}
    assert sorted(evals) == [0, 20, 40]
    start, end = evals[0], evals[40]
    # step 0: the adapter (B = 0) is the reference, so every reward is 0 and the loss is log 2
    assert abs(start["eval/loss"] - math.log(2)) < 1e-6
    # Zero up to float32 rounding: the policy (B = 0) and reference passes are two XLA programs, and XLA
    # may lay out their base matmuls differently, so they agree to rounding, not bit for bit.
    tol = 1e-6 * abs(start["eval/logps/chosen"])
    assert abs(start["eval/rewards/margins"]) <= tol and abs(start["eval/rewards/chosen"]) <= tol, start
    assert end["eval/rewards/accuracies"] > 0.5, end
    assert end["eval/rewards/margins"] > start["eval/rewards/margins"] + 0.1, end
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert f"eval/{key}" in end
    trained = [r for r in _records(out) if "train/loss" in r]  # the training steps log TRL's names too
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
    for key in names:
        assert all(f"train/{key}" in r for r in trained), key
    assert trained[-1]["train/rewards/margins"] > trained[0]["train/rewards/margins"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir())


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
LOGPS = ("rewards/accuracies", "logps/chosen", "logps/rejected")
METRICS = (*REWARDS, *LOGPS)
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def trl_pairs(assets, tok, tmp_path_factory):
    """Pairs of the demo set (single-turn, prompt under 96 tokens, most answers cut at 128 tokens) plus one
    short pair that keeps its EOS, as ShareGPT rows (jaxlora), TRL conversational and TRL standard rows."""
    rows = json.loads((assets / "data" / "llamafactory_dpo_en_demo.json").read_text())
    rows = [r for r in rows if len(r["conversations"]) == 1]
    rows = [r for r in rows if len(tok(r["conversations"][0]["value"])["input_ids"]) < 96][:3]
    rows.append({"conversations": [{"from": "human", "value": "Once upon a time"}],
                 "chosen": {"from": "gpt", "value": " there was a cat."},
                 "rejected": {"from": "gpt", "value": " no."}})  # fmt: skip
    msg = lambda m: {"role": ROLES[m["from"]], "content": m["value"]}  # noqa: E731
    sides = ("chosen", "rejected")
    conv = [{"prompt": [msg(m) for m in r["conversations"]], **{s: [msg(r[s])] for s in sides}} for r in rows]
    std = [{"prompt": r["conversations"][0]["value"], **{s: r[s]["value"] for s in sides}} for r in rows]
    tmp = tmp_path_factory.mktemp("trl")
    return tmp, rows, conv, std


def _jax_pairs(tmp: Path, tok, rows, name: str):
    cfg = DataConfig(train=[{"path": str(_write(tmp / name, rows)), "format": "preference"}], seq_len=128,
                     chat_template="chatml", validation_split=0.0)  # fmt: skip
    return build_pairs(cfg, tok, 0, None)[0]  # TRL 1.16 has no max_prompt_length: only max_length


def _same_tokens(pairs, trl_rows: list[dict], prompt_key: str, side_key: str, joined: bool = False):
    """jaxlora's pair i equals TRL's row i: prompt + answer ids (`side_key` % side; already prompt + answer
    when `joined`), cut at 128, prompt masked."""
    assert len(pairs) == len(trl_rows)
    for i, row in enumerate(trl_rows):
        p = row[prompt_key]
        for s in ("chosen", "rejected"):
            ids = row[side_key % s] if joined else p + row[side_key % s]
            ex = getattr(pairs, s)[i]
            assert ex["input_ids"].tolist() == ids[:128], (i, s)
            assert (ex["labels"][: len(p)] == -100).all() and (ex["labels"][len(p) :] != -100).all(), (i, s)


def _trl_model(stories_dir, adapter: Path, trainer_cls, **kw):
    """A real TRL trainer on the PyTorch stories260K with a new PEFT LoRA (reference: adapter disabled, as a
    fresh adapter in TRL) into which jaxlora's exported adapter is loaded."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lcfg = LoraConfig.from_pretrained(adapter)
    lcfg.inference_mode = False
    base = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    trainer = trainer_cls(model=base, peft_config=lcfg, **kw)
    loaded = set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    trainer.model.eval()
    return trainer


LOSSES = {"sigmoid": PrefSpec("dpo", 0.1, "sigmoid"), "ipo": PrefSpec("dpo", 0.1, "ipo"),
          "hinge": PrefSpec("dpo", 0.1, "hinge"), "orpo": PrefSpec("orpo", orpo_alpha=0.1)}  # fmt: skip


@pytest.fixture(scope="module")
def jax_evals(dpo_run, stories_dir, tok, trl_pairs) -> dict:
    """jaxlora's eval step for every loss (one compile), with the run's final checkpoint, on the standard
    rows as one batch: {loss name: per-pair means}."""
    (out, cfg), (tmp, _, _, std) = dpo_run, trl_pairs
    jm = load_model(stories_dir)
    lora, _ = restore_lora(out / "checkpoints")
    scale = jnp.asarray(lora_scale(jm.config, config_from_dict(cfg).lora))
    pairs = _jax_pairs(tmp, tok, std, "std.json")
    batch = next(PairLoader(pairs, len(pairs), 128, shuffle=False, prefetch=0, num_epochs=1))
    spec = StepSpec(jm.config.with_runtime(packed=False))
    steps = {name: make_eval_step(Preference(spec, prefs)) for name, prefs in LOSSES.items()}
    res = jax.jit(lambda *a: {name: step(*a) for name, step in steps.items()})(
        lora, jm.params, {k: jnp.asarray(batch[k]) for k in PAIR_KEYS}, scale
    )
    out = {}
    for name, r in res.items():
        n = float(r.pop("count"))
        assert n == len(pairs)
        out[name] = {k: float(v) / n for k, v in r.items()}
    return out


def _close(got: float, want: float, what, tol: float = 1e-5) -> float:
    """Asserts |got - want| <= tol (relative above 1); returns that scaled difference."""
    diff = abs(got - want) / max(1.0, abs(want))
    assert diff <= tol, (what, got, want)
    return diff


def test_dpo_matches_trl_dpo_trainer(dpo_run, stories_dir, tok, trl_pairs, jax_evals):
    """The trained adapter in TRL 1.16's real `DPOTrainer` (PEFT, reference = adapter disabled): TRL's own
    tokenization of the same rows, and its loss and logged metrics for sigmoid, IPO and hinge, equal
    jaxlora's eval step in float32."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    out, _ = dpo_run
    tmp, rows, conv, std = trl_pairs
    ttok = load_tokenizer(stories_dir)
    ttok.chat_template = resolve_chat_template(ttok, "chatml")  # TRL renders with the tokenizer's template
    n = len(rows)
    trainers, worst, worst_reward = {}, 0.0, 0.0
    for kind in ("sigmoid", "ipo", "hinge"):
        args = DPOConfig(output_dir=str(tmp / kind), beta=0.1, loss_type=[kind], max_length=128, report_to=[],
                         use_cpu=True, per_device_eval_batch_size=n)  # fmt: skip
        data = {"train_dataset": Dataset.from_list(std), "eval_dataset": Dataset.from_list(conv)}
        trainers[kind] = _trl_model(
            stories_dir, out / "adapter", DPOTrainer, args=args, processing_class=ttok, **data
        )
    # tokenization: TRL standard (EOS appended, kept by the short pair); ShareGPT rows vs TRL conversational
    std_rows = list(trainers["sigmoid"].train_dataset)
    _same_tokens(_jax_pairs(tmp, tok, std, "std.json"), std_rows, "prompt_ids", "%s_ids")
    assert std_rows[-1]["chosen_ids"][-1] == tok.eos_token_id
    conv_rows = list(trainers["sigmoid"].eval_dataset)
    _same_tokens(_jax_pairs(tmp, tok, rows, "sharegpt.json"), conv_rows, "prompt_ids", "%s_ids")
    for kind, trainer in trainers.items():
        batch = trainer.data_collator(list(trainer.train_dataset))
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch).item()
        logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # what TRL logs for this batch
        got = jax_evals[kind]
        worst = max(worst, _close(got["loss"], loss, kind), *(_close(got[k], logged[k], k) for k in LOGPS))
        for key in REWARDS:  # beta * (a difference of float32 sums near -280, whose ulp is 3e-5)
            worst_reward = max(worst_reward, _close(got[key], logged[key], key, tol=1e-4))
        assert logged["rewards/chosen"] != 0 != logged["rewards/rejected"]  # policy != reference
    print(f"jaxlora vs TRL DPOTrainer: max difference {worst:.1e}, rewards {worst_reward:.1e}")
    # cDPO label smoothing: TRL 1.16's sigmoid loss no longer reads label_smoothing (only robust, exo_pair and
    # aot do), so this keeps the cDPO formula of TRL's earlier sigmoid loss, on the same kind of log-probs
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (torch.tensor(rng.normal(-150, 20, 4), dtype=torch.float32) for _ in range(4))
    nc = nr = torch.full((4,), 60.0)
    ls, beta = 0.2, 0.1
    args = (jnp.asarray(t.numpy()) for t in (pc, pr, rc, rr, nc, nr))
    got, _ = dpo_loss(PrefSpec("dpo", beta, "sigmoid", ls), *args)
    d = beta * ((pc - rc) - (pr - rr))
    _close(float(got.mean()), (-(1 - ls) * F.logsigmoid(d) - ls * F.logsigmoid(-d)).mean().item(), "cdpo")


def test_orpo_matches_trl_orpo_trainer(dpo_run, stories_dir, tok, trl_pairs, jax_evals):
    """TRL 1.16 keeps ORPO in `trl.experimental.orpo`: its tokenization of standard rows, loss (NLL over the
    whole chosen sequence, prompt included, minus alpha log sigmoid of the log odds ratio) and metrics equal
    jaxlora's ORPO eval step with the same adapter."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    out, _ = dpo_run
    tmp, _, _, std = trl_pairs
    ttok = load_tokenizer(stories_dir)
    ttok.pad_token = ttok.eos_token  # TRL's collator pads with it (padding carries no loss)
    args = ORPOConfig(output_dir=str(tmp / "orpo"), beta=0.1, max_length=128, report_to=[], use_cpu=True)
    trainer = _trl_model(stories_dir, out / "adapter", ORPOTrainer, args=args, processing_class=ttok,
                         train_dataset=Dataset.from_list(std))  # fmt: skip
    pairs, ds = _jax_pairs(tmp, tok, std, "std.json"), list(trainer.train_dataset)
    _same_tokens(pairs, ds, "prompt_input_ids", "%s_input_ids", joined=True)
    with torch.no_grad():
        loss, logged = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(ds), "eval")
    got = jax_evals["orpo"]
    keys = (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")
    worst = max(
        _close(got["loss"], loss.item(), "loss"), *(_close(got[k], logged[f"eval_{k}"], k) for k in keys)
    )
    print(f"jaxlora vs TRL ORPOTrainer: max difference {worst:.1e}")


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _pairs(tmp_path, tok, rows, name="d.json", **data):
    max_prompt = data.pop("max_prompt_length", None)
    cfg = DataConfig(
        train=[{"path": str(_write(tmp_path / name, rows)), "format": "preference", **data.pop("src", {})}],
        seq_len=data.pop("seq_len", 64), chat_template="chatml", validation_split=0.0, **data,
    )  # fmt: skip
    return build_pairs(cfg, tok, 0, max_prompt)[0]


def test_layouts_standard_conversational_and_nested(tmp_path, tok):
    std = _pairs(tmp_path, tok, [{"prompt": "Once upon a time", "chosen": " a cat sat.", "rejected": " no."}])
    ex_c, ex_r = std.chosen[0], std.rejected[0]
    prompt = tok("Once upon a time")["input_ids"]
    n = len(prompt)
    assert ex_c["input_ids"][:n].tolist() == prompt == ex_r["input_ids"][:n].tolist()  # shared prompt
    assert (ex_c["labels"][:n] == -100).all() and (ex_c["labels"][n:] != -100).all()
    assert ex_c["input_ids"][-1] == tok.eos_token_id  # EOS appended, as TRL
    conv = [{
        "prompt": [{"role": "user", "content": "Hi there"}],
        "chosen": [{"role": "assistant", "content": "Hello friend"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }]  # fmt: skip
    c = _pairs(tmp_path, tok, conv, "c.json")
    text = tok.decode(c.chosen[0]["input_ids"])
    assert "<|im_start|>user" in text and "Hello friend" in text
    resp = tok.decode(c.chosen[0]["input_ids"][c.chosen[0]["labels"] != -100])
    assert "Hello friend" in resp and "Hi there" not in resp
    implicit = [{s: conv[0]["prompt"] + conv[0][s] for s in ("chosen", "rejected")}]  # TRL: no prompt key
    i = _pairs(tmp_path, tok, implicit, "i.json")
    assert i.chosen[0]["labels"].tolist() == c.chosen[0]["labels"].tolist()
    nested = [{"input": {"messages": conv[0]["prompt"]}, "good": "Hello friend", "bad": "Go away"}]
    nested[0]["good"] = {"from": "gpt", "value": "Hello friend"}
    nested[0]["bad"] = {"from": "gpt", "value": "Go away"}
    for m in nested[0]["input"]["messages"]:
        m["from"], m["value"] = m.pop("role"), m.pop("content")
    src = {"fields": {"messages": "input.messages", "chosen": "good", "rejected": "bad", "role": "from",
                      "content": "value"}}  # fmt: skip
    n = _pairs(tmp_path, tok, nested, "n.json", src=src)
    assert n.chosen[0]["input_ids"].tolist() == c.chosen[0]["input_ids"].tolist()


def test_truncation_as_trl(tmp_path, tok):
    long = {"prompt": "one two three four five six seven eight nine ten " * 3, "chosen": " yes " * 40,
            "rejected": " no"}  # fmt: skip
    p = _pairs(tmp_path, tok, [long], seq_len=48, max_prompt_length=8)
    ex = p.chosen[0]
    assert len(ex["input_ids"]) == 48
    assert (ex["labels"][:8] == -100).all() and (ex["labels"][8:] != -100).all()
    with pytest.raises(UserError, match=r"row 0: the prompt has \d+ tokens, leaving no room"):
        _pairs(tmp_path, tok, [long], "l.json", seq_len=16)
    kept = _pairs(tmp_path, tok, [long, {**long, "prompt": "hi"}], "s.json", seq_len=16, skip_invalid=True)
    assert len(kept) == 1


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "a", "chosen": "b"}, "row 0: missing field 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": "  "}, "row 0: field 'rejected' is an empty response"),
        ({"text": "a"}, "row 0: not a preference row"),
    ],
)
def test_bad_rows(tmp_path, tok, row, match):
    with pytest.raises(UserError, match=match):
        _pairs(tmp_path, tok, [row])


def test_equal_pair_warns_and_counts(tmp_path, tok, caplog):
    p = _pairs(
        tmp_path,
        tok,
        [{"prompt": "a", "chosen": "b", "rejected": "b"}, {"prompt": "a", "chosen": "b", "rejected": "c"}],
    )
    assert p.same == 1 and len(p) == 2
    assert "1 pairs have chosen equal to rejected" in caplog.text


def test_bad_config(assets, tmp_path):
    with pytest.raises(UserError, match=r"prefs.beta must be > 0, got 0"):
        config_from_dict(dpo_config(assets, tmp_path, **{"prefs.beta": 0}))
    cfg = dpo_config(assets, tmp_path / "o", **{"train.max_steps": 1})
    cfg["data"]["train"][0] = {"path": str(assets / "data" / "alpaca_100.json"), "format": "alpaca"}
    with pytest.raises(UserError, match="format alpaca has no preference pairs"):
        train(config_from_dict(cfg))
    cfg = dpo_config(assets, tmp_path / "p", **{"train.max_steps": 1, "train.objective": "sft"})
    with pytest.raises(UserError, match="format preference holds pairs for train.objective dpo or orpo"):
        train(config_from_dict(cfg))


def test_accumulation_kill_and_resume_give_same_losses(dpo_run, assets, tmp_path):
    ref = _losses(dpo_run[0])
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    over = {"train.batch_size": 4, "train.grad_accum_steps": 2, "train.eval_every_steps": None}  # 8 a step
    cfg = dpo_config(assets, out, **over)
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "scripts/train.py", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= 21):  # step 20 saved
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    train(config_from_dict(cfg), resume=True)  # what `scripts/train.py --resume` calls, here in-process
    resumed = _losses(out)
    assert sorted(resumed) == sorted(ref)  # steps after the kill were logged again by the resumed run
    assert [r["step"] for r in _records(out) if "train/loss" in r].count(1) == 1  # resumed, not restarted
    diff = max(abs(resumed[s] - ref[s]) / abs(ref[s]) for s in resumed)
    print(f"accumulated and resumed vs one batch: max relative loss difference {diff:.1e}")
    assert diff <= 2e-5


def _max_abs(tree) -> float:
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))


def test_init_from_a_run_with_the_initial_adapter_as_reference(dpo_run, assets, tmp_path):
    """A DPO run continued from the first run's folder (its latest checkpoint), against base + that adapter
    frozen: at step 0 policy and reference agree, so the rewards are 0 and the loss is log 2."""
    first, _ = dpo_run
    start, _ = restore_lora(first / "checkpoints")
    assert _max_abs({g: {n: leaf["b"] for n, leaf in mods.items()} for g, mods in start.items()}) > 1e-2
    out = tmp_path / "run"
    over = {"lora.init_from": str(first), "prefs.reference": "initial_adapter", "train.max_steps": 2,
            "train.eval_every_steps": None, "train.learning_rate": 1e-4}  # fmt: skip
    train(config_from_dict(dpo_config(assets, out, **over)))
    step1 = next(r for r in _records(out) if "train/loss" in r)
    assert step1["step"] == 1
    tol = 1e-6 * abs(step1["train/logps/chosen"])  # float32 rounding of two summed passes; beta = 0.1
    assert abs(step1["train/loss"] - math.log(2)) <= tol, step1  # d loss / d margin = -1/2 at 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(step1[f"train/{key}"]) <= tol, (key, step1)
    end, _ = restore_lora(out / "checkpoints")  # two small steps on from the first run's adapter
    moved = _max_abs(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), end, start))
    assert 0 < moved < 1e-3, moved


def test_sft_init_from_a_peft_folder_starts_at_that_adapter(dpo_run, assets, stories_dir, tmp_path):
    """SFT from a PEFT adapter folder: the step-0 LoRA gives the logits real PEFT gives with that adapter;
    an adapter whose r or targets differ from the run's LoRA config is refused in one line."""
    import optax
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxlora.lora import LoraConfig, init_lora
    from jaxlora.models.decoder import forward
    from jaxlora.train.setup import choose_plan
    from jaxlora.train.state import build_state, load_init_from

    adapter = dpo_run[0] / "adapter"
    raw = dpo_config(assets, tmp_path / "sft", **{"train.objective": "sft", "lora.init_from": str(adapter)})
    raw["data"]["train"][0] = {"path": str(assets / "data" / "alpaca_100.json"), "format": "alpaca"}
    cfg = config_from_dict(raw)
    jm = load_model(stories_dir)
    state = build_state(cfg, jm.config, optax.adamw(1e-3), choose_plan(cfg), None, None, False, jm.params)
    ids = np.arange(1, 33)[None]  # [1, 32]
    got = forward(jm.params, jm.config, jnp.asarray(ids), lora=state.adapter.tree(),
                  lora_scale=jnp.asarray(lora_scale(jm.config, cfg.lora)))  # fmt: skip
    torch_base = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(torch_base, adapter).eval()
    with torch.no_grad():
        want = peft_model(torch.as_tensor(ids)).logits.numpy()
        with peft_model.disable_adapter():
            plain = peft_model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(want - plain).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)

    key = jax.random.key(0)
    bad = {
        r"has r=8, alpha=16.0 but .*lora.r=4": dict(r=4),
        "targets differ from this run's lora.target_modules": dict(target_modules=("q_proj",)),
    }
    for match, over in bad.items():
        lcfg = LoraConfig(**{"r": 8, "alpha": 16, "init_from": str(adapter), **over})
        with pytest.raises(UserError, match=match):
            load_init_from(lcfg, jm.config, init_lora(jm.config, lcfg, key))
