"""TRL's `min_p` and `repetition_penalty` sampling knobs (`grpo.min_p`, `grpo.repetition_penalty`):
`warp` with min-p is transformers' Temperature -> TopK -> TopP -> MinP warpers, the penalty is
transformers' `RepetitionPenaltyLogitsProcessor` (left padding not counted, as transformers skips it),
greedy `generate` and the greedy rollout with a penalty give transformers' greedy `generate` tokens,
a sampled G = 1 rollout with both knobs draws `generate`'s tokens for the same seed, and a `grpo.min_p`
out of [0, 1] is a one-line config error. One tiny Qwen2 checkpoint for the module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.models import load_model
from jaxlora.models.generate import generate, left_pad, penalize, seen_tokens, warp
from jaxlora.models.rollout import rollout
from tests.helpers.hf_generate import hf_greedy
from tests.helpers.hf_tiny import make_hf_model

PROMPTS = [[1, 17, 40, 9, 33, 72, 5], [1, 60, 8], [1, 22, 17, 4, 90]]  # left-padded to 7
NEW = 16
PAD = 0
PENALTY = 1.3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, jaxlora model) of one tiny random Qwen2."""
    folder = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_model("qwen2", folder)
    return hf, load_model(folder)


def _logits(rows: int, v: int, seed: int) -> np.ndarray:
    """[rows, V] float32 logits from flat to peaked rows, some of them negative."""
    spread = np.geomspace(0.3, 8.0, rows, dtype=np.float32)[:, None]
    return (np.random.default_rng(seed).normal(size=(rows, v)) * spread).astype(np.float32)


def _same(out: np.ndarray, ref: np.ndarray) -> None:
    """The same -inf set, and the finite values equal to 1e-6."""
    assert np.array_equal(np.isfinite(out), np.isfinite(ref))
    np.testing.assert_allclose(out[np.isfinite(out)], ref[np.isfinite(ref)], rtol=1e-6, atol=1e-6)


def test_min_p_warp_equals_transformers_warpers():
    x = _logits(8, 3000, seed=2)
    for temperature, top_k, top_p, min_p in [
        (1.0, 0, 1.0, 0.05),
        (0.7, 0, 1.0, 0.2),
        (1.3, 50, 0.9, 0.1),
        (1.0, 0, 0.8, 0.3),
        (0.9, 7, 1.0, 0.5),
        (1.0, 0, 1.0, 1.0),  # only the best token (and any tied with it)
    ]:
        ref = torch.tensor(x)
        for warper in [
            TemperatureLogitsWarper(temperature),
            *([TopKLogitsWarper(top_k)] if top_k else []),
            *([TopPLogitsWarper(top_p)] if top_p < 1 else []),
            MinPLogitsWarper(min_p),
        ]:
            ref = warper(None, ref)
        out = np.asarray(warp(jnp.asarray(x), temperature, top_k, top_p, min_p))
        _same(out, ref.numpy())
        kept = np.isfinite(out).sum(-1)
        assert kept.min() >= 1 and (kept < 3000).any() and (min_p == 1.0 or kept.max() > 1), kept
        if top_k == 0 and top_p == 1.0:  # min-p alone cut the peaked rows
            assert (kept[-3:] < 50).all(), kept
    ties = np.array([[2.0, 2.0, 1.0, -5.0], [0.5, 3.0, 3.0, 3.0]], np.float32)
    _same(
        np.asarray(warp(jnp.asarray(ties), 1.0, 0, 1.0, 1.0)),
        MinPLogitsWarper(1.0)(None, torch.tensor(ties)).numpy(),
    )
    assert np.array_equal(np.asarray(warp(jnp.asarray(x), 1.0, 0, 1.0, None)), x)  # None: off
    assert np.array_equal(np.asarray(warp(jnp.asarray(x), 1.0, 0, 1.0, 0.0)), x)  # 0: off


def test_repetition_penalty_equals_transformers_processor():
    x = _logits(4, 500, seed=3)
    ids = np.random.default_rng(4).integers(0, 500, size=(4, 30))
    ids[:, 5] = ids[:, 4]  # a repeated token counts once
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(x)).numpy()
        seen = seen_tokens(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), 500)
        out = np.asarray(penalize(jnp.asarray(x), seen, penalty))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
        assert (out != x).any(axis=-1).all()
    # left padding: transformers' generate passes where each row's real tokens start, and skips what is before
    mask = np.ones_like(ids)
    mask[0, :10], mask[2, :25] = 0, 0
    start = torch.tensor(np.argmax(mask, axis=1))
    ref = RepetitionPenaltyLogitsProcessor(PENALTY, prompt_ignore_length=start)(
        torch.tensor(ids), torch.tensor(x)
    )
    seen = seen_tokens(jnp.asarray(ids), jnp.asarray(mask), 500)
    np.testing.assert_allclose(
        np.asarray(penalize(jnp.asarray(x), seen, PENALTY)), ref.numpy(), rtol=1e-6, atol=0
    )


def test_greedy_with_a_repetition_penalty_is_transformers_generate(tiny):
    """Greedy `generate` and the greedy rollout (G = 2) with repetition_penalty 1.3: transformers' tokens,
    on prompts of one length and on left-padded ones (transformers' generate skips its left padding)."""
    hf, model = tiny
    same_length = [[1, 17, 40, 9, 33], [1, 60, 8, 44, 21]]
    for prompts in (same_length, PROMPTS):
        ids, mask = left_pad(prompts, PAD)
        ref = hf_greedy(hf, ids, mask, NEW, eos=None, pad=PAD, repetition_penalty=PENALTY)
        got = generate(model.params, model.config, prompts, NEW, eos_ids=(), repetition_penalty=PENALTY)
        assert np.array_equal(np.array(got), ref), (got, ref)
        plain = generate(model.params, model.config, prompts, NEW, eos_ids=())
        assert got != plain  # the penalty changed the greedy tokens
    out = rollout(
        model.params, model.config, None, 1.0, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
        num_generations=2, max_new_tokens=NEW, temperature=0.0, repetition_penalty=PENALTY, pad_id=PAD,
    )  # fmt: skip
    comp = np.asarray(out.completions)
    assert np.array_equal(comp[::2], ref) and np.array_equal(comp[1::2], ref)


def test_sampled_rollout_with_min_p_and_penalty_is_generates(tiny):
    """G = 1 rollout with min_p and repetition_penalty draws `generate`'s tokens from the same seed."""
    _, model = tiny
    ids, mask = left_pad(PROMPTS, PAD)
    knobs = dict(temperature=1.5, top_k=40, min_p=0.1, repetition_penalty=PENALTY)
    out = rollout(
        model.params, model.config, None, 1.0, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5),
        num_generations=1, max_new_tokens=NEW, eos_ids=(), pad_id=PAD, **knobs,
    )  # fmt: skip
    ref = generate(model.params, model.config, PROMPTS, NEW, seed=5, eos_ids=(), **knobs)
    assert np.asarray(out.completions).tolist() == ref
    plain = generate(model.params, model.config, PROMPTS, NEW, seed=5, eos_ids=(), temperature=1.5, top_k=40)
    assert ref != plain  # the knobs changed the draws


@pytest.mark.parametrize(
    ("grpo", "message"),
    [
        ({"min_p": 1.5}, "grpo.min_p must be in [0, 1], got 1.5"),
        ({"min_p": -0.1}, "grpo.min_p must be in [0, 1], got -0.1"),
        ({"repetition_penalty": 0}, "grpo.repetition_penalty must be > 0, got 0"),
    ],
)
def test_sampling_knob_errors_are_one_line(grpo, message):
    raw = {
        "output_dir": "/tmp/run",
        "model": {"path": "org/model"},
        "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}]},
        "grpo": grpo,
    }
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    ok = config_from_dict({**raw, "grpo": {"min_p": 0.05, "repetition_penalty": 1.1}}).grpo
    assert (ok.min_p, ok.repetition_penalty) == (0.05, 1.1)
