"""[grpo] The GRPO objective, advantages, metrics and reward functions against TRL 1.16's real
`GRPOTrainer` on a tiny Llama with the real PEFT LoRA (A and B non-zero, the same weights in jaxlora):
its rollouts (sampled completions, rewards from our reward functions, advantages, old and reference
log-probs) and its loss, LoRA gradients and metrics for every loss_type, scale_rewards mode, beta 0 and
> 0, num_iterations 2, GSPO's sequence-level ratios, the high-entropy token mask and the entropy bonus,
within 1e-5. Then the one train step (accumulation equals one batch), the `grpo:` config section and the
rewards' loading, calling and errors.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file

from jaxlora.config import config_from_dict
from jaxlora.config.grpo import GrpoSection
from jaxlora.config.sections import TrainSection
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model, load_tokenizer
from jaxlora.peft.adapter import save_peft_adapter
from jaxlora.train.advantages import advantages, completion_metrics, reward_metrics, truncated
from jaxlora.train.grpo import Grpo, GrpoSpec, batch_loss, completion_logps, grpo_batch
from jaxlora.train.objective import StepSpec
from jaxlora.train.rewards import RewardError, load_reward, load_rewards, score
from jaxlora.train.step import make_eval_step, make_train_step
from tests.helpers import grpo_trl as trl_ref
from tests.helpers.hf_tiny import copy_tokenizer, make_hf_model
from tests.helpers.peft_torch import randomized

G, MAX_LEN, TEMPERATURE = 4, 8, 0.7
EOS = [2, *range(100, 140)]  # several EOS ids, so that some completions stop before MAX_LEN
ROWS = [
    {"prompt": "Once upon a time", "answer": "3"},
    {"prompt": "The little dog", "answer": None},
    {"prompt": "Tom had 3 apples and", "answer": "12"},
    {"prompt": "Lily saw", "answer": None},
]
FILE_REWARD = '''
def brevity(completions, completion_ids, answer, **kwargs):
    """None (not applicable) for an odd-length completion of a row without an answer."""
    rows = zip(completions, completion_ids, answer)
    return [None if a is None and len(i) % 2 else -len(c) / 10 for c, i, a in rows]
'''
SPECS = ["my_rewards.py:brevity", "tests.helpers.grpo_rewards:token_parity", "jaxlora:exact_answer"]
WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stories_dir):
    """The tiny model on both sides, a LoRA with A and B non-zero (saved as a PEFT adapter for TRL), our
    reward functions, and TRL's trainer with them. Torch runs on one thread: its matmuls here are tiny,
    and thread hand-offs cost more than they do (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("grpo")
    folder = tmp / "model"
    hf = make_hf_model("llama", folder, vocab_size=512)
    hf.generation_config.eos_token_id = EOS
    hf.generation_config.save_pretrained(folder)
    copy_tokenizer(stories_dir, folder)
    model = load_model(folder)
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = randomized(init_lora(model.config, lcfg, jax.random.key(0)), 1)
    save_peft_adapter(tmp / "adapter", lora, lcfg, model.config, None)
    (tmp / "my_rewards.py").write_text(FILE_REWARD)
    funcs = load_rewards(SPECS, base_dir=tmp)
    trainer = trl_ref.build_trainer(
        folder, tmp / "adapter", [f.fn for f in funcs], WEIGHTS, tmp / "trl", num_generations=G,
        per_device_train_batch_size=len(ROWS) * G, max_completion_length=MAX_LEN, temperature=TEMPERATURE,
    )  # fmt: skip
    spec = StepSpec(model.config.with_runtime(packed=False))
    yield {"tmp": tmp, "folder": folder, "model": model, "lora_cfg": lcfg, "lora": lora, "funcs": funcs,
           "trainer": trainer, "scale": jnp.asarray(lora_scale(model.config, lcfg)), "spec": spec,
           "tok": load_tokenizer(folder)}  # fmt: skip
    torch.set_num_threads(threads)


def _rows() -> list[dict]:
    return [r for r in ROWS for _ in range(G)]  # TRL's sampler: each prompt G times in a row


@pytest.fixture(scope="module")
def rollouts(setup):
    """TRL's rollouts of the same completions (one seed) under each advantage setting; the last with
    beta > 0 and num_iterations 2, so that it returns the old and reference log-probs."""
    tr = setup["trainer"]
    runs = {}
    for name, over in {"group": {}, "batch": {"scale_rewards": "batch"}, "none": {"scale_rewards": "none"},
                       "normalize_then_sum": {"multi_objective_aggregation": "normalize_then_sum"},
                       "masked": {"mask_truncated_completions": True},
                       "group_mu2_beta": {"num_iterations": 2, "beta": 0.04}}.items():  # fmt: skip
        trl_ref.configure(tr, **over)
        runs[name] = trl_ref.rollout(tr, _rows())
    return runs


def _close(got, want, what, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    same_nan = np.isnan(got) == np.isnan(want)
    assert same_nan.all(), (what, got, want)
    diff = np.abs(np.nan_to_num(got) - np.nan_to_num(want)) / np.maximum(1.0, np.abs(np.nan_to_num(want)))
    assert diff.max(initial=0.0) <= tol, (what, diff.max(), got, want)


# ---------------------------------------------------------------------------------------------------
# Rollouts: rewards, advantages, metrics, log-probs


ADVANTAGES = {  # rollout -> (scale_rewards, multi_objective_aggregation)
    "group": ("group", "sum_then_normalize"),
    "batch": ("batch", "sum_then_normalize"),
    "none": ("none", "sum_then_normalize"),
    "normalize_then_sum": ("group", "normalize_then_sum"),
    "masked": ("group", "sum_then_normalize"),
}


@pytest.mark.parametrize("mode", sorted(ADVANTAGES))
def test_rewards_advantages_and_metrics_equal_trl(setup, rollouts, mode):
    """Our reward functions called by `score` on the rollout's decoded completions give TRL's rewards
    (None as NaN, one completion no function scores); `advantages`, `reward_metrics` and
    `completion_metrics` give TRL's advantages and metrics; the truncation rule gives its loss mask."""
    out, metrics, logs = rollouts[mode]
    ids = trl_ref.completion_lists(out, EOS)
    assert ids == trl_ref.completion_lists(rollouts["group"][0], EOS)  # one seed: the same completions
    completions = setup["tok"].batch_decode(ids, skip_special_tokens=True)  # as TRL decodes them
    assert completions == logs["completion"] and [r["prompt"] for r in _rows()] == logs["prompt"]
    rows = _rows()
    per_func = score(setup["funcs"], [r["prompt"] for r in rows], completions, ids,
                     {"answer": [r["answer"] for r in rows]})  # fmt: skip
    names = [f.name for f in setup["funcs"]]
    assert names == ["brevity", "token_parity", "exact_answer"]
    for j, name in enumerate(names):  # the same rewards, None as NaN, called as TRL calls them
        _close(per_func[:, j], logs["rewards"][name], name, tol=0)
    assert np.isnan(per_func).all(axis=1).any() and np.isnan(per_func).any(axis=1).sum() > 1  # None cases
    scale, agg = ADVANTAGES[mode]
    adv, zero_std = advantages(per_func, WEIGHTS, G, scale, agg)
    _close(adv, out["advantages"].numpy(), "advantages")
    cut = truncated(ids, [*EOS, setup["tok"].pad_token_id])
    assert cut.any() and not cut.all()
    mine = reward_metrics(per_func, names, WEIGHTS, zero_std)
    mine.update(completion_metrics([len(i) for i in ids], cut))
    assert set(mine) == set(metrics) - {"num_tokens"}
    for key, value in mine.items():
        _close(value, metrics[key], key)
    mask = np.zeros_like(out["completion_mask"].numpy())
    for i, row in enumerate(ids):  # the loss mask: through the first EOS; none for a cut one when masked
        mask[i, : len(row)] = 0 if (mode == "masked" and cut[i]) else 1
    np.testing.assert_array_equal(mask, out["completion_mask"].numpy())


def test_completion_logps_equal_trl(setup, rollouts, policy):
    """Per-token log-probs of the completions (temperature-scaled) with the adapter, and with it off (the
    reference), equal TRL's old and reference log-probs."""
    out = rollouts["group_mu2_beta"][0]
    mask = out["completion_mask"].numpy()
    _close(np.asarray(policy[0]) * mask, out["old_per_token_logps"].numpy() * mask, "with the adapter")
    ref = jax.jit(completion_logps, static_argnums=(4, 5))(
        None, setup["model"].params, _batch(out), setup["scale"], setup["spec"], TEMPERATURE
    )[0]
    _close(np.asarray(ref) * mask, out["ref_per_token_logps"].numpy() * mask, "the adapter off")


def _batch(out: dict) -> dict:
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    b = grpo_batch(*(out[k].numpy() for k in keys))
    return {k: jnp.asarray(v) for k, v in b.items()}


# ---------------------------------------------------------------------------------------------------
# The loss, its gradient and metrics, for every setting


CASES = {
    "grpo": ("group", {"loss_type": "grpo"}),
    "bnpo": ("group", {"loss_type": "bnpo"}),
    "dr_grpo_batch": ("batch", {"loss_type": "dr_grpo"}),
    "dapo": ("group", {}),
    "dapo_none": ("none", {"loss_type": "dapo"}),
    "cispo_mu2": ("group", {"loss_type": "cispo", "epsilon_high": 1.2, "num_iterations": 2}),
    "sapo_mu2": ("group", {"loss_type": "sapo", "num_iterations": 2}),
    "luspo_gspo": ("group", {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 0.04,
                             "num_iterations": 2}),
    "vespo_mu2": ("group", {"loss_type": "vespo", "num_iterations": 2}),
    "dapo_beta": ("group", {"beta": 0.04}),
    "grpo_beta_no_correction": ("group", {"loss_type": "grpo", "beta": 0.04,
                                          "use_bias_correction_kl": False}),
    "dapo_mu2_eps_high": ("group", {"num_iterations": 2, "epsilon_high": 0.28, "beta": 0.04}),
    "gspo_mu2_beta": ("group", {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.04,
                                "num_iterations": 2, "beta": 0.04}),
    "bnpo_mu2_delta": ("group", {"loss_type": "bnpo", "num_iterations": 2, "delta": 1.1}),
    "dapo_off_policy_mask": ("group", {"num_iterations": 2, "off_policy_mask_threshold": 0.02}),
    "dr_grpo_masked": ("masked", {"loss_type": "dr_grpo", "mask_truncated_completions": True}),
    "grpo_top_entropy": ("group", {"loss_type": "grpo", "top_entropy_quantile": 0.5}),
    "dapo_top_entropy": ("group", {"top_entropy_quantile": 0.5}),
    "dapo_entropy_coef": ("group", {"entropy_coef": 0.01}),
    "bnpo_top_entropy_coef_beta": ("group", {"loss_type": "bnpo", "top_entropy_quantile": 0.2,
                                             "entropy_coef": 0.01, "beta": 0.04, "num_iterations": 2}),
}  # fmt: skip


@pytest.fixture(scope="module")
def policy(setup, rollouts):
    """The one forward pass all cases share: log-probs and entropies [B, C] with the adapter, and the
    pullback of cotangents on both to the LoRA gradient (the chain rule: the loss depends on the adapter
    only through them), compiled once; and `batch_loss` with its gradient in the log-probs and entropies
    (zero for the entropies unless entropy_coef != 0)."""
    out = rollouts["group_mu2_beta"][0]
    batch, params, scale, spec = _batch(out), setup["model"].params, setup["scale"], setup["spec"]

    def outputs_of(lora):
        return completion_logps(lora, params, batch, scale, spec, TEMPERATURE, entropy_grad=True)[:2]

    logps, ent = jax.jit(outputs_of)(setup["lora"])
    pullback = jax.jit(lambda lo, cots: jax.vjp(outputs_of, lo)[1](cots)[0])
    loss_of = jax.jit(jax.value_and_grad(batch_loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    return logps, ent, pullback, loss_of


def _inputs(rollouts, data: str, settings: dict) -> dict:
    """TRL's inputs for a case: the rollout's, the reference log-probs when beta > 0, and with
    num_iterations 2 old log-probs that differ from the current ones."""
    out = dict(rollouts[data][0])
    ref = rollouts["group_mu2_beta"][0]
    out.pop("old_per_token_logps", None)
    out.pop("ref_per_token_logps", None)
    if settings.get("beta"):
        out["ref_per_token_logps"] = ref["ref_per_token_logps"]
    if settings.get("num_iterations", 1) > 1:
        out["old_per_token_logps"] = trl_ref.with_old_logps(ref, 0.3)
    return out


def _case_batch(inputs: dict) -> dict:
    """Our batch arrays besides the token ids (shared by the cases): advantages, loss mask, log-probs."""
    mb = {"advantages": jnp.asarray(inputs["advantages"].numpy()),
          "completion_mask": jnp.asarray(inputs["completion_mask"].numpy(), jnp.float32)}  # fmt: skip
    for key, name in (("old_per_token_logps", "old_logps"), ("ref_per_token_logps", "ref_logps")):
        if key in inputs:
            mb[name] = jnp.asarray(inputs[key].numpy())
    return mb


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_gradient_and_metrics_equal_trl(setup, rollouts, policy, case):
    """One batch, and the batch as 2 micro-batches (each `batch_loss` with the whole batch's `totals`,
    summed as the train step sums them) against TRL with 2 gradient accumulation steps."""
    data, settings = CASES[case]
    tr = setup["trainer"]
    trl_ref.configure(tr, max_completion_length=MAX_LEN, **settings)
    inputs = _inputs(rollouts, data, settings)
    g = GrpoSpec.from_section(GrpoSection(max_completion_length=MAX_LEN, temperature=TEMPERATURE, **settings))
    logps, ent, pullback, loss_of = policy
    mb = _case_batch(inputs)
    assert set(mb) | {"input_ids", "positions", "segment_ids"} == set(g.batch_keys)
    for accumulation in (1, 2):
        want_loss, want_grads, want_metrics = trl_ref.loss_and_grads(tr, inputs, accumulation)
        split = lambda x, a=accumulation: x.reshape(a, x.shape[0] // a, *x.shape[1:])  # noqa: E731
        parts = jax.tree.map(split, (logps, ent, mb))
        totals = Grpo(setup["spec"], g).totals(parts[2])
        value, sums, cots = 0.0, {}, []
        for i in range(accumulation):
            (v, s), cot = loss_of(g, *jax.tree.map(lambda x, i=i: x[i], parts), totals)
            value, sums = value + v, {k: sums.get(k, 0.0) + x for k, x in s.items()}
            cots.append(cot)
        _close(float(value), want_loss, ("loss", accumulation))
        cot = jax.tree.map(lambda *c: jnp.concatenate(c), *cots)  # (log-probs', entropies') [B, C]
        got = _peft_tensors(setup, pullback(setup["lora"], cot))
        assert sorted(got) == sorted(want_grads)
        scale = max(np.abs(w).max() for w in want_grads.values())
        assert scale > 1e-3, scale  # the case has a gradient
        for name, want in want_grads.items():
            _close(got[name] / scale, want / scale, (name, accumulation))
        if accumulation == 1:  # TRL logs each micro-batch's means; ours are the batch's (equal for one)
            metrics = Grpo(setup["spec"], g).finish(value, sums, totals)[1]
            del metrics["loss"], metrics["tokens"]
            assert set(metrics) == set(want_metrics) - {"clip_ratio/low_min", "clip_ratio/high_max"}
            for name, v in metrics.items():
                _close(float(v), want_metrics[name], name)
    if settings.get("num_iterations", 1) > 1 and "clip_ratio/region_mean" in sums:
        assert float(sums["clip_ratio/region_mean"]) > 0  # the moved policy is clipped somewhere


def _peft_tensors(setup, grads) -> dict:
    """A LoRA-shaped gradient tree as PEFT's tensor names and layouts (through the adapter writer)."""
    out = setup["tmp"] / "grads"
    save_peft_adapter(out, grads, setup["lora_cfg"], setup["model"].config, None, overwrite=True)
    return load_file(str(out / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------
# The objective on the one train step and eval step


@pytest.mark.parametrize(("case", "trl_split"), [("gspo_mu2_beta", 1), ("bnpo_top_entropy_coef_beta", 2)])
def test_train_step_accumulates_to_trls_batch(setup, rollouts, case, trl_split):
    """`Grpo` on `make_train_step` (plain SGD: the update is minus the gradient) over 2 micro-batches
    equals TRL's loss, gradient and metrics on the whole batch (GSPO with the KL term; every loss_type's
    accumulation is checked above), or, where the loss depends on the split (bnpo, the entropy quantile
    and bonus, per micro-batch), TRL's loss and gradient with 2 accumulation steps; the eval step gives
    TRL's loss on the whole batch."""
    data, settings = CASES[case]
    tr = setup["trainer"]
    trl_ref.configure(tr, max_completion_length=MAX_LEN, **settings)
    inputs = _inputs(rollouts, data, settings)
    want_loss, want_grads, want_metrics = trl_ref.loss_and_grads(tr, inputs, trl_split)
    whole_loss = trl_ref.loss_and_grads(tr, inputs)[0]
    g = GrpoSpec.from_section(GrpoSection(max_completion_length=MAX_LEN, temperature=TEMPERATURE, **settings))
    objective = Grpo(setup["spec"], g)
    assert objective.updates_per_batch == 2 and "old_logps" in objective.batch_keys
    batch = {**_batch(inputs), **_case_batch(inputs)}
    assert set(batch) == set(objective.batch_keys)
    two = jax.tree.map(lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:]), batch)
    sgd = optax.sgd(1.0)
    lora = setup["lora"]
    step = jax.jit(make_train_step(objective, sgd))
    new, _, metrics = step(Adapter.split(lora), sgd.init(lora), setup["model"].params, two, jax.random.key(0),
                           setup["scale"])  # fmt: skip
    grads = jax.tree.map(lambda old, updated: old - updated, lora, new.tree())
    got = _peft_tensors(setup, grads)
    scale = max(np.abs(w).max() for w in want_grads.values())
    for name, want in want_grads.items():
        _close(got[name] / scale, want / scale, name)
    _close(float(metrics["loss"]), want_loss, "loss")
    assert float(metrics["tokens"]) == float(inputs["completion_mask"].sum())
    assert not bool(metrics["nonfinite"])
    # TRL logs each micro-batch's means, ours are the batch's: equal on one micro-batch, or for constants
    same = (
        set(want_metrics) - {"clip_ratio/low_min", "clip_ratio/high_max"}
        if trl_split == 1
        else {"entropy_coef"}
    )
    for name in same:
        _close(float(metrics[name]), want_metrics[name], name)
    evaluated = jax.jit(make_eval_step(objective))(lora, setup["model"].params, batch, setup["scale"])
    _close(float(evaluated["loss"]), whole_loss, "eval loss")
    assert float(evaluated["count"]) == 1.0


# ---------------------------------------------------------------------------------------------------
# The grpo: section


def test_grpo_section_defaults_are_trls():
    from trl import GRPOConfig

    theirs = GRPOConfig.__dataclass_fields__
    ours = GrpoSection()
    shared = [name for name in GrpoSection.model_fields if name in theirs]
    assert set(GrpoSection.model_fields) - set(shared) == {"max_prompt_length", "reward_funcs"}
    for name in shared:
        assert getattr(ours, name) == theirs[name].default, name
    assert GrpoSpec.from_section(ours) == GrpoSpec()  # the spec's defaults are the section's


MINIMAL = {
    "output_dir": "/tmp/run",
    "model": {"path": "org/model"},
    "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}]},
    "train": {"eval_every_steps": None},
}


def _grpo_config(grpo: dict, train: TrainSection | None = None):
    raw = {**MINIMAL, "grpo": grpo}
    if train is not None:
        raw["train"] = train
    return config_from_dict(raw)


def test_grpo_section_reads_rewards_and_round_trips(tmp_path):
    boxed = {"name": "jaxlora:exact_answer", "args": {"extract": "boxed"}}
    grpo = {"reward_funcs": ["a.py:f", boxed], "reward_weights": [1, 0.5], "scale_rewards": False}
    cfg = _grpo_config(grpo)
    funcs = cfg.grpo.reward_funcs
    assert [f.name for f in funcs] == ["a.py:f", "jaxlora:exact_answer"]
    assert funcs[1].args == {"extract": "boxed"}
    assert cfg.grpo.reward_weights == (1.0, 0.5) and cfg.grpo.scale_rewards == "none"  # TRL's False
    assert config_from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(config_from_dict(cfg.to_dict()))


@pytest.mark.parametrize(
    ("grpo", "train", "message"),
    [
        ({"reward_funcs": ["a.py:f"], "reward_weights": [1, 2]}, None,
         "grpo.reward_weights has 2 weights for 1 reward functions; give one weight per function"),
        ({"reward_funcs": ["rewards.py"]}, None, "grpo.reward_funcs[0].name: 'rewards.py' names no function"),
        ({"reward_funcs": [{"name": "a:f", "args": {"x": {"y": 1}}}]}, None, "grpo.reward_funcs[0].args.x: "),
        ({"loss_type": "dpo"}, None, "grpo.loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
        ({"num_generations": 1}, None, "grpo.num_generations must be >= 2, got 1"),
        ({"top_entropy_quantile": 0}, None, "grpo.top_entropy_quantile must be in (0, 1], got 0.0"),
        ({"reward_funcs": ["a.py:f"], "num_generations": 4}, {"batch_size": 3, "grad_accum_steps": 2},
         "train.batch_size x train.grad_accum_steps = 6 completions per step is not divisible by "
         "grpo.num_generations = 4; make it a multiple of 4"),
        ({}, {"batch_size": 8}, "train.objective is grpo but grpo.reward_funcs is empty"),
    ],
)  # fmt: skip
def test_grpo_section_errors_are_one_line(grpo, train, message):
    # train.objective does not admit grpo until the loop runs it: a section built without validation
    section = None
    if train is not None:
        fields = {**TrainSection().model_dump(), "objective": "grpo", **train}
        section = TrainSection.model_construct(**fields)
    with pytest.raises(UserError) as err:
        _grpo_config(grpo, section)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------------
# Reward functions: loading, calling, built-ins, errors


def _gsm8k(assets: Path, n: int = 12) -> list[dict]:
    lines = (assets / "data" / "gsm8k_test.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_exact_answer_extractions(assets):
    rows = _gsm8k(assets)
    finals = [r["answer"].split("####")[-1].strip() for r in rows]
    right = [f"Let me think. So the answer is {int(f):,}." for f in finals]  # thousands separators too
    wrong = [f"So the answer is {int(f) + 1}" for f in finals]
    f = load_reward("jaxlora:exact_answer").fn  # last number, the row's `answer` (GSM8K's ends "#### n")
    answers = [r["answer"] for r in rows]
    assert f(completions=right, answer=answers) == [1.0] * len(rows)
    assert f(completions=wrong, answer=answers) == [0.0] * len(rows)
    conversational = [[{"role": "assistant", "content": c}] for c in right[:2]]
    assert f(completions=conversational + ["no number"], answer=[*answers[:2], None]) == [1.0, 1.0, None]
    boxed = load_reward("jaxlora:exact_answer", {"extract": "boxed", "column": "solution"}).fn
    got = boxed(completions=["so \\boxed{\\frac{1}{2}}.", "\\boxed{2} then \\boxed{3}", "\\boxed{x", "42"],
                solution=["\\frac{1}{2}", "\\boxed{3}", "x", "42"])  # fmt: skip
    assert got == [1.0, 1.0, 0.0, 0.0]
    regex = load_reward("jaxlora:exact_answer", {"extract": "regex", "pattern": r"Answer:\s*(\w+)"}).fn
    got = regex(completions=["Answer: cat. Answer: dog", "Answer:dog", "dog"], answer=["dog"] * 3)
    assert got == [1.0, 1.0, 0.0]


def test_format_and_length_rewards_equal_trls():
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    texts = [
        "<think>\nreasoning\n</think>\nanswer", "<think>a</think>", "no tags", "<think>a<think>b",
        "<think>a<think>b</think>", "x <think>a</think>", "<think>\n\nmulti\nline</think> ok\nmore",
    ]  # fmt: skip
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    ours = load_reward("jaxlora:format_reward", {"pattern": r"^<think>(?!.*<think>)(.*?)</think>.*$"}).fn
    assert ours(completions=completions) == think_format_reward(completions) == ours(completions=texts)
    assert 0 < sum(ours(completions=texts)) < len(texts)
    ids = [[7] * n for n in range(14)]
    for max_length, cache in ((10, 4), (10, 0), (6, 6)):
        mine = load_reward("jaxlora:length_penalty", {"max_length": max_length, "cache": cache}).fn
        assert mine(completion_ids=ids) == get_soft_overlong_punishment(max_length, cache)(ids)


def test_rewards_load_by_file_and_module_and_take_what_they_name(setup):
    sol = {"name": "jaxlora:exact_answer", "args": {"column": "sol"}}
    funcs = load_rewards(["tests.helpers.grpo_rewards:first_letter", sol, "jaxlora:exact_answer"])
    assert [f.name for f in funcs] == ["first_letter", "exact_answer", "exact_answer_2"]
    columns = {"sol": ["1", "3", None], "answer": ["1"] * 3}
    got = score(funcs, ["p"] * 3, ["a 1", "2", "b"], [[1], [2], [3]], columns)
    np.testing.assert_array_equal(got, np.array([[1, 1, 1], [0, 0, 0], [1, np.nan, 0]], np.float32))


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        ("missing.py:f", {}, "reward function 'missing.py:f': file "),
        ("no_such_package.rewards:f", {}, "reward function 'no_such_package.rewards:f': no module named "),
        ("tests.helpers.grpo_rewards:nope", {}, "reward function 'tests.helpers.grpo_rewards:nope': "
         "tests.helpers.grpo_rewards has no 'nope' (it defines: broken, first_letter, not_a_number"),
        ("jaxlora:nope", {}, "unknown built-in reward function 'jaxlora:nope'; the built-ins are "
         "jaxlora:exact_answer, jaxlora:format_reward, jaxlora:length_penalty"),
        ("jaxlora:exact_answer", {"extract": "middle"},
         "reward function 'jaxlora:exact_answer': extract must be one of last_number, boxed, regex"),
        ("jaxlora:format_reward", {"pattern": "("}, "reward function 'jaxlora:format_reward': missing ), "),
        ("tests.helpers.grpo_rewards:first_letter", {"bonus": 1}, "reward function "
         "'tests.helpers.grpo_rewards:first_letter' takes no argument 'bonus' (its arguments: completions)"),
        ("bad_syntax.py:f", {}, "reward function 'bad_syntax.py:f': "),
        ("rewards", {}, "reward function 'rewards' names no function"),
    ],
)  # fmt: skip
def test_reward_loading_errors_are_one_line(tmp_path, spec, args, message):
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    with pytest.raises(UserError) as err:
        load_reward(spec, args, base_dir=tmp_path)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "reward function 'broken' (tests.helpers.grpo_rewards:broken) raised ZeroDivisionError: "
         "float division by zero on row 12 (prompt 'p2'); fix the function or that row"),
        ("too_few", "reward function 'too_few' (tests.helpers.grpo_rewards:too_few) returned 3 rewards for 4 "
         "completions; return one float or None per completion"),
        ("not_a_number", "reward function 'not_a_number' (tests.helpers.grpo_rewards:not_a_number) returned "
         "'high' (str) for row 10; return a float or None"),
    ],
)  # fmt: skip
def test_reward_call_errors_name_the_function_and_the_row(name, message):
    funcs = load_rewards([f"tests.helpers.grpo_rewards:{name}"])
    with pytest.raises(RewardError) as err:  # the loop catches it to save a checkpoint first
        score(funcs, [f"p{i}" for i in range(4)], ["a"] * 4, [[1]] * 4, rows=[10, 11, 12, 13])
    assert isinstance(err.value, UserError) and str(err.value) == message
    missing = load_rewards(["jaxlora:exact_answer"])
    no_column = "no column 'answer' in the data (columns: q); set args.column"
    with pytest.raises(RewardError, match=re.escape(no_column)):
        score(missing, ["p"], ["a"], [[1]], {"q": ["x"]})
