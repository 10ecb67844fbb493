"""[frontier] Generation on Qwen3.5's hybrid decoder (`qwen3_5_text`): the KV cache of the attention layers
and the conv and recurrent states of the Gated DeltaNet layers (`jaxlora.models.hybrid_cache`).

One tiny random `Qwen3_5ForCausalLM` (tests/helpers/hf_tiny.py: 2 DeltaNet layers then 1 attention layer,
twice) and three left-padded prompts of different lengths serve every check: greedy generation equals
transformers' `generate` token for token; its logits equal a full forward
over the generated text (recomputed, no cache) and a float64 transformers forward; a GRPO rollout (G = 2,
the prompt's cache and states repeated; the period scan) equals transformers' greedy completions, a sampled
rollout with an adapter (per-layer decode) samples `generate`'s tokens, and the training forward's log-probs
of its completions (`completion_logps`) equal the ones generation sampled from. The multimodal checkpoint
(`qwen3_5`) generates from its text tower as transformers does (layers unrolled).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models import forward, load_model
from jaxlora.models.generate import generate, left_pad
from jaxlora.models.rollout import rollout
from jaxlora.train.grpo import completion_logps, grpo_batch
from jaxlora.train.objective import StepSpec
from tests.helpers.hf_generate import hf_greedy
from tests.helpers.hf_tiny import make_hf_qwen3_5, model_cache
from tests.helpers.peft_torch import randomized

PROMPTS = [[1, 5, 9, 33, 40, 7, 11], [1, 60], [1, 22, 17, 4]]  # lengths 7, 2, 4: left-padded
NEW = 12
PAD = 0


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """(folder, jaxlora model, prompt ids and mask [3, 7], transformers' greedy tokens [3, NEW], our greedy
    tokens [3, NEW] and the logits of each step [3, NEW, V]), built once."""
    folder, hf, model = model_cache(tmp_path_factory)("qwen3_5_text")
    ids, mask = left_pad(PROMPTS, PAD)
    new, logits = generate(model.params, model.config, PROMPTS, NEW, eos_ids=(), return_logits=True)
    return folder, model, ids, mask, hf_greedy(hf, ids, mask, NEW), np.asarray(new), logits


def test_greedy_equals_transformers_generate(gen):
    _, _, _, _, ref, new, _ = gen
    assert np.array_equal(new, ref), (new, ref)


def test_kv_cache_logits_equal_recompute_and_float64_transformers(gen):
    """Each step's logits against a forward over prompt + generated tokens (causal: position t's logits
    recompute the step that drew token t + 1) and transformers' forward in float64."""
    folder, model, _, _, _, new, logits = gen
    ids, mask = left_pad([p + row.tolist() for p, row in zip(PROMPTS, new, strict=True)], PAD)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    at = slice(ids.shape[1] - NEW - 1, ids.shape[1] - 1)  # the positions that drew the NEW tokens
    full = forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    recompute = float(np.abs(np.asarray(full)[:, at] - logits).max())
    hf64 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        t = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        want = hf64(**{k: torch.tensor(v, dtype=torch.long) for k, v in t.items()}).logits.numpy()[:, at]
    exact = float(np.abs(logits - want).max())
    print(f"qwen3.5 KV cache: max |logits diff| vs recompute {recompute:.2e}, vs float64 HF {exact:.2e}")
    assert exact < 1e-4
    # float32 noise of the full forward (its own gap to float64 here is ~1.1e-4 at one position)
    assert recompute < 2e-4


def test_grpo_rollout_greedy_equals_transformers(gen):
    """G = 2: the prompt's keys, values and DeltaNet states repeated for both completions; decoded with the
    period scan (`split_layers` off, the GPU's way; the next test decodes on per-layer arrays)."""
    _, model, ids, mask, ref, _, _ = gen
    out = rollout(
        model.params, model.config, None, 1.0, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
        num_generations=2, max_new_tokens=NEW, temperature=0.0, pad_id=PAD, split_layers=False,
    )  # fmt: skip
    got = np.asarray(out.completions)
    assert np.array_equal(got[::2], ref) and np.array_equal(got[1::2], ref)


def test_sampled_rollout_logps_equal_the_training_forward(gen):
    """With an adapter, temperature 0.7 and an EOS, decoding on per-layer weights and states (`split_layers`,
    the CPU's default): the rollout samples `generate`'s tokens (G = 1, one seed), and `completion_logps` on
    its completions equals the log-probs of the logits that drew them."""
    _, model, ids, mask, _, _, _ = gen
    cfg, temp = model.config, 0.7
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = randomized(init_lora(cfg, lc, jax.random.key(0)), seed=1, std=0.3)
    scale = jnp.asarray(lora_scale(cfg, lc))
    sampled = dict(temperature=temp, seed=5, lora=lora, lora_scale=scale)
    eos = generate(model.params, cfg, PROMPTS, NEW, eos_ids=(), **sampled)[0][NEW // 2]  # row 0 stops there
    out = rollout(
        model.params, cfg, lora, scale, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5),
        num_generations=1, max_new_tokens=NEW, temperature=temp, eos_ids=(eos,), pad_id=PAD,
    )  # fmt: skip
    comp, cmask = np.asarray(out.completions), np.asarray(out.mask)
    new, logits = generate(model.params, cfg, PROMPTS, NEW, eos_ids=(eos,), return_logits=True, **sampled)
    assert len(new[0]) <= NEW // 2 + 1 and out.lengths[0] == len(new[0])
    assert [row[: len(g)].tolist() for row, g in zip(comp, new, strict=True)] == new
    n = logits.shape[1]
    picked = np.take_along_axis(jax.nn.log_softmax(logits / temp), comp[:, :n, None], axis=-1)[..., 0]
    batch = {k: jnp.asarray(v) for k, v in grpo_batch(ids, mask, comp, cmask).items()}
    logps = jax.jit(completion_logps, static_argnums=(4, 5))(
        lora, model.params, batch, scale, StepSpec(cfg), temp
    )[0]
    gap = float(np.abs((np.asarray(logps)[:, :n] - picked) * cmask[:, :n]).max())
    print(f"qwen3.5 rollout: lengths {out.lengths.tolist()}, |training - sampled log-probs| {gap:.2e}")
    assert gap < 1e-4


def test_multimodal_qwen3_5_text_tower_generates_as_transformers(gen, tmp_path):
    """A `Qwen3_5ForConditionalGeneration` checkpoint (model_type qwen3_5) generates from its text tower as
    transformers' `generate` does on the same left-padded text prompts; here with the layers unrolled
    (`scan_layers` off)."""
    _, _, ids, mask, _, _, _ = gen
    hf = make_hf_qwen3_5(tmp_path)
    model = load_model(tmp_path)
    new = generate(model.params, model.config.with_runtime(scan_layers=False), PROMPTS, NEW, eos_ids=())
    assert np.array_equal(np.asarray(new), hf_greedy(hf, ids, mask, NEW))
