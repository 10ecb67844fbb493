"""The rollout engine (`jaxlora.models.rollout`): greedy completions equal transformers' `generate` token for
token (left-padded prompts of different lengths, per-row EOS stopping), sampling is `generate`'s, seeded,
inside top-k and drawn from the softmax, the G completions of a prompt differ, a second call compiles
nothing, and it runs with LoRA (equal to the merged weights) and with an int8 base; the per-layer decode
(the CPU default) samples what the layer scan samples; the logits sampling draws from are transformers'
warpers' (temperature, top-k, top-p), and top-p's nucleus is the sorted definition's exactly; on a
4-device mesh (FSDP x tensor, base and adapter placed as the train step places them) it samples the
single device's completions. One tiny Qwen2 checkpoint for the module."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from jaxlora.lora import LoraConfig, init_lora, lora_scale, merge
from jaxlora.models import forward, load_model
from jaxlora.models.generate import categorical, generate, left_pad, nucleus, warp
from jaxlora.models.rollout import rollout
from jaxlora.quant import make_quantizer
from tests.helpers.hf_generate import hf_greedy
from tests.helpers.hf_tiny import make_hf_model
from tests.helpers.parallel_runs import _env
from tests.helpers.peft_torch import randomized

PROMPTS = [[1, 17, 40, 9, 33, 72, 5], [1, 60, 8], [1, 22, 17, 4, 90]]  # lengths 7, 3, 5: left-padded
NEW = 12
PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch model, jaxlora model, ids [3, 7], mask [3, 7]) of one tiny random Qwen2."""
    folder = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_model("qwen2", folder)
    ids, mask = left_pad(PROMPTS, PAD)
    return folder, hf, load_model(folder), ids, mask


def run(model, ids, mask, seed=0, lora=None, scale=1.0, params=None, **kw):
    """`rollout` on numpy prompts (greedy, G = 1 unless told), its result as numpy."""
    kw = {"num_generations": 1, "max_new_tokens": NEW, "temperature": 0.0, "pad_id": PAD, **kw}
    params = model.params if params is None else params
    key = jax.random.key(seed)
    out = rollout(params, model.config, lora, scale, jnp.asarray(ids), jnp.asarray(mask), key, **kw)
    return jax.tree.map(np.asarray, out)


def test_greedy_equals_transformers_generate_with_eos_per_row(tiny):
    _, hf, model, ids, mask = tiny
    free = hf_greedy(hf, ids, mask, NEW, eos=None, pad=PAD)  # no EOS: every row runs NEW tokens
    assert free.shape == (3, NEW)
    # as EOS, the token that most rows meet short of all of them (here: one row at its first token, one
    # midway, one never)
    rows_hit = {int(t): sum(t in row for row in free) for t in np.unique(free) if t != PAD}
    eos = max((t for t, n in rows_hit.items() if n < 3), key=lambda t: (rows_hit[t], -t))
    ref = hf_greedy(hf, ids, mask, NEW, eos=eos, pad=PAD)
    for g in (1, 2):  # G = 2: the prompt's cache repeated, both copies equal to transformers'
        out = run(model, ids, mask, num_generations=g, eos_ids=(eos,))
        got = out.completions[::g]
        assert np.array_equal(out.completions[g - 1 :: g], got)  # with G = 2, the second copy too
        assert np.array_equal(got[:, : ref.shape[1]], ref), (got, ref)
        assert (got[:, ref.shape[1] :] == PAD).all()
        hit = [list(r).index(eos) + 1 if eos in r else NEW for r in free]
        assert out.lengths[::g].tolist() == hit and out.truncated[::g].tolist() == [h == NEW for h in hit]
        assert np.array_equal(out.mask[::g], np.arange(NEW)[None] < np.array(hit)[:, None])
    assert min(hit) < NEW and max(hit) == NEW  # the EOS really stopped a row, and not all of them


def test_sampling_is_generates_seeded_and_inside_top_k(tiny):
    _, _, model, ids, mask = tiny
    kw = dict(temperature=1.0, top_p=0.9, eos_ids=())
    out = run(model, ids, mask, seed=5, **kw)
    ref = generate(model.params, model.config, PROMPTS, NEW, seed=5, eos_ids=(), temperature=1.0, top_p=0.9)
    assert out.completions.tolist() == ref  # G = 1 draws the tokens `generate` draws from the same key
    # top-k 3 at a high temperature: every token is one of the 3 best at its step, and not always the best
    a = run(model, ids, mask, seed=7, temperature=5.0, top_k=3, num_generations=4)
    b = run(model, ids, mask, seed=7, temperature=5.0, top_k=3, num_generations=4)
    assert np.array_equal(a.completions, b.completions) and a.truncated.all()
    full = np.concatenate([np.repeat(ids, 4, axis=0), a.completions], axis=1)  # [12, 7 + NEW]
    full_mask = np.concatenate([np.repeat(mask, 4, axis=0), a.mask], axis=1)
    pos = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    logits = np.asarray(
        forward(model.params, model.config, jnp.asarray(full), jnp.asarray(pos), jnp.asarray(full_mask))
    )
    step_logits = logits[:, ids.shape[1] - 1 : -1]  # [12, NEW, V]: the logits each token was drawn from
    rank = (step_logits > np.take_along_axis(step_logits, a.completions[..., None], -1)).sum(-1)
    assert rank.max() < 3 and (rank > 0).mean() > 0.2, rank
    # the G = 4 completions of each prompt differ
    for p in range(3):
        assert len({tuple(r) for r in a.completions[4 * p : 4 * p + 4]}) == 4


def test_categorical_draws_the_softmax_distribution():
    """`generate.sample`'s draw (an inverted CDF in blocks): 8 tokens in blocks of 3 (two levels, padding)."""
    probs = np.array([0.3, 0.0, 0.05, 0.25, 0.1, 0.0, 0.2, 0.1])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (100_000, 8))
    draws = np.asarray(categorical(jax.random.key(0), logits, block=3))
    freq = np.bincount(draws, minlength=8) / len(draws)
    assert freq[probs == 0].sum() == 0  # a -inf logit is never drawn
    assert np.abs(freq - probs).max() < 5 * np.sqrt(0.25 / len(draws)), freq


def test_second_call_compiles_nothing_and_the_loop_is_one_while(tiny):
    _, _, model, ids, mask = tiny
    kw = dict(temperature=1.0, top_k=5, num_generations=2, eos_ids=(2,))
    run(model, ids, mask, seed=0, **kw)
    size = rollout._cache_size()
    other = np.where(mask == 1, (ids + 3) % model.config.vocab_size, PAD)  # new prompt values, same shapes
    run(model, other, mask, seed=1, **kw)
    assert rollout._cache_size() == size
    args = (model.params, model.config, None, 1.0, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    jaxpr = str(rollout.trace(*args, max_new_tokens=NEW, pad_id=PAD, **kw).jaxpr)
    assert jaxpr.count("while[") == 1  # the decode loop is in the program, not in Python


def test_lora_changes_the_output_as_its_merged_weights(tiny):
    _, _, model, ids, mask = tiny
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), seed=1, std=0.3)  # non-zero B
    scale = jnp.asarray(lora_scale(model.config, lc))
    adapted = run(model, ids, mask, lora=lora, scale=scale)
    base = run(model, ids, mask)
    merged = run(model, ids, mask, params=merge(model.params, lora, scale))
    assert not np.array_equal(adapted.completions, base.completions)
    assert np.array_equal(adapted.completions, merged.completions)


def test_int8_base_rollout_equals_generate(tiny):
    folder, _, _, ids, mask = tiny
    model = load_model(folder, quantizer=make_quantizer("int8"))
    out = run(model, ids, mask, num_generations=2, eos_ids=())
    ref = generate(model.params, model.config, PROMPTS, NEW, eos_ids=())
    assert out.completions[::2].tolist() == out.completions[1::2].tolist() == ref


def test_split_layers_decode_equals_the_scanned_one(tiny):
    """Per-layer weights and cache (`split_layers`, the CPU default) or the layer scan (the GPU's): the
    same completions, here sampled with an adapter."""
    _, _, model, ids, mask = tiny
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), seed=1, std=0.3)
    scale = jnp.asarray(lora_scale(model.config, lc))
    kw = dict(seed=3, lora=lora, scale=scale, temperature=1.0, top_k=20, num_generations=2, eos_ids=(2,))
    split = run(model, ids, mask, split_layers=True, **kw)
    scanned = run(model, ids, mask, split_layers=False, **kw)
    assert np.array_equal(split.completions, scanned.completions)
    assert np.array_equal(split.lengths, scanned.lengths)


def _logits(rows: int, v: int, seed: int = 0) -> np.ndarray:
    """[rows, V] float32 logits from flat (nucleus of thousands) to peaked (a few tokens)."""
    spread = np.geomspace(0.3, 8.0, rows, dtype=np.float32)[:, None]
    return (np.random.default_rng(seed).normal(size=(rows, v)) * spread).astype(np.float32)


def sorted_nucleus(x: np.ndarray, top_p: float) -> tuple[np.ndarray, float]:
    """The definition: sort each row (best first, ties by index), keep a token while the mass of the
    better ones is under top_p. Returns (kept [B, V] bool, the closest |mass before - top_p|)."""
    order = np.argsort(-x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, -1).astype(np.float64)
    p = np.exp(xs - xs.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    before = np.cumsum(p, -1) - p
    kept = np.zeros(x.shape, bool)
    np.put_along_axis(kept, order, before < top_p, -1)
    return kept, float(np.abs(before - top_p).min())


def test_top_p_nucleus_is_the_sorted_definition():
    """`nucleus` keeps exactly the sorted definition's tokens with their logits unchanged (so the same
    renormalized probabilities), whether its `candidates` best tokens hold the nucleus or it sorts;
    ties at the boundary go by index."""
    x = _logits(8, 3000)
    ties = np.round(x[:2] * 2) / 2 + 0.25  # values repeated hundreds of times (none 0: no -0.0 == 0.0)
    for logits, top_p, candidates in [
        (x, 0.9, 256),  # flat rows: too few candidates, the rows are sorted
        (x[5:], 0.9, 256),  # peaked rows only: found among the candidates
        (x[5:], 0.5, 16),
        (x, 0.95, 3000),
        (ties, 0.6, 2000),
    ]:
        kept, margin = sorted_nucleus(logits, top_p)
        assert margin > 1e-6  # no row within float32 rounding of the boundary
        out = np.asarray(nucleus(jnp.asarray(logits), top_p, candidates))
        assert np.array_equal(np.isfinite(out), kept), (top_p, candidates)
        assert np.array_equal(out[kept], logits[kept])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))
    best = -np.sort(-probs, axis=-1)[:, :256].sum(-1)  # the mass of each row's 256 best
    assert (best[5:] >= 0.9).all() and (best[:5] < 0.9).all()  # so both paths ran


def test_warp_equals_transformers_warpers():
    """The logits `sample` draws from are transformers' Temperature -> TopK -> TopP warpers' output."""
    x = _logits(8, 3000, seed=1)
    for temperature, top_k, top_p in [
        (0.7, 0, 0.9),
        (1.0, 50, 0.8),
        (1.3, 0, 0.5),
        (1.0, 7, 1.0),
        (1.0, 0, 0.99),
    ]:
        ref = torch.tensor(x)
        for warper in [
            TemperatureLogitsWarper(temperature),
            *([TopKLogitsWarper(top_k)] if top_k else []),
            *([TopPLogitsWarper(top_p)] if top_p < 1 else []),
        ]:
            ref = warper(None, ref)
        ref = ref.numpy()
        out = np.asarray(warp(jnp.asarray(x), temperature, top_k, top_p))
        assert np.array_equal(np.isfinite(out), np.isfinite(ref)), (temperature, top_k, top_p)
        assert np.array_equal(out[np.isfinite(out)], ref[np.isfinite(ref)])
        assert 1 < np.isfinite(out).sum(-1).max() < 3000  # a choice left, and a cut made


MESH_ROLLOUT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxlora.config import ParallelSection
from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
from jaxlora.models.rollout import rollout
from jaxlora.parallel import make_plan
from tests.helpers.peft_torch import randomized
folder, ids, mask, mesh, kw = sys.argv[1], *map(json.loads, sys.argv[2:])
kw["eos_ids"] = tuple(kw["eos_ids"])
model = load_model(folder)
lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
lora = randomized(init_lora(model.config, lc, jax.random.key(0)), seed=1, std=0.3)
scale = jnp.asarray(lora_scale(model.config, lc))
ids, mask = jnp.asarray(ids), jnp.asarray(mask)
rows = len(ids) * kw["num_generations"]
plan = make_plan(ParallelSection(strategy="mesh", mesh=mesh), rows, model.config.num_kv_heads)
sharded = plan.place(model.params, plan.param_shardings(model.params))
for params, lo in [(model.params, lora), (sharded, plan.place(lora, plan.lora_shardings(lora)))]:
    out = rollout(params, model.config, lo, scale, ids, mask, jax.random.key(11), **kw)
    devices = len(params["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set)
    print("RESULT", json.dumps({"devices": devices, "completions": np.asarray(out.completions).tolist()}))
"""


def test_rollout_on_a_mesh_samples_the_single_device_completions(tiny):
    """The rollout of `GRPOFeed` with the base and adapter sharded by the train step's plan (FSDP 2 x
    tensor 2 on 4 CPU devices), sampled with a fixed key: the completions of one device."""
    folder, _, _, ids, mask = tiny
    kw = dict(
        num_generations=2, max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9, eos_ids=(), pad_id=PAD
    )
    mesh = {"fsdp": 2, "tensor": 2}
    args = [str(folder), *(json.dumps(a) for a in (ids.tolist(), mask.tolist(), mesh, kw))]
    cmd = [sys.executable, "-c", MESH_ROLLOUT, *args]
    proc = subprocess.run(cmd, env=_env(4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, sharded = [
        json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")
    ]
    assert single["devices"] == 1 and sharded["devices"] == 4
    assert sharded["completions"] == single["completions"]
    assert len({tuple(r) for r in single["completions"]}) == 6  # sampled: the rows differ
