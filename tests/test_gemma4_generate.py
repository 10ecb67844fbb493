"""[frontier] Generation on Gemma 4's text decoder (`gemma4_text`) with its KV cache
(`jaxlora.models.gemma4_cache`): the keys and values of the layers with their own k/v, stacked by layer type,
the KV-shared layers attending with their source layer's.

Three tiny random `Gemma4ForCausalLM` (tests/helpers/hf_gemma4.py: sliding and full layers alternating,
window 4, shorter than prompt plus new tokens; full layers of twice the head dim): the last 2 layers
KV-shared, with and without `attention_k_eq_v`, and a MoE model without PLE or KV-shared layers (as
26B-A4B). With three left-padded prompts of different lengths: greedy generation equals transformers'
greedy `generate` token for token; its logits equal a full forward over the generated text (recomputed, no
cache); a GRPO rollout (G = 2, the prompt's cache repeated) equals transformers' greedy completions, and
a sampled one with an adapter, decoding on per-layer arrays, samples `generate`'s tokens. The multimodal
checkpoint (`gemma4`) generates from its text tower as transformers does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.lora import LoraConfig, init_lora, lora_scale
from jaxlora.models import forward, load_model
from jaxlora.models.generate import generate, left_pad
from jaxlora.models.rollout import rollout
from tests.helpers.hf_gemma4 import make_gemma4, make_hf_gemma4
from tests.helpers.hf_generate import hf_greedy
from tests.helpers.peft_torch import randomized

PROMPTS = [[1, 5, 9, 33, 40, 7, 11], [1, 60], [1, 22, 17, 4]]  # lengths 7, 2, 4: left-padded
NEW = 8
PAD = 0
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
VARIANTS = {
    "plain": {},
    "k_eq_v": {"k_eq_v": True},
    "moe": {"k_eq_v": True, **MOE, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0},  # as 26B-A4B
}


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """{variant: (jaxlora model, transformers' greedy tokens [3, NEW], ours [3, NEW], our logits of each
    step [3, NEW, V])}, built once."""
    ids, mask = left_pad(PROMPTS, PAD)
    out = {}
    for name, kw in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"gemma4_gen_{name}")
        hf = make_gemma4(folder, **kw)
        model = load_model(folder)
        new, logits = generate(model.params, model.config, PROMPTS, NEW, eos_ids=(), return_logits=True)
        out[name] = (model, hf_greedy(hf, ids, mask, NEW), np.asarray(new), logits)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_transformers_generate(variant, gen):
    _, ref, new, _ = gen[variant]
    assert np.array_equal(new, ref), (new, ref)


@pytest.mark.parametrize("variant", ["plain", "k_eq_v"])
def test_kv_cache_logits_equal_recompute(variant, gen):
    """Each step's logits against a forward over prompt + generated tokens (causal: position t's logits
    recompute the step that drew token t + 1)."""
    model, _, new, logits = gen[variant]
    ids, mask = left_pad([p + row.tolist() for p, row in zip(PROMPTS, new, strict=True)], PAD)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    at = slice(ids.shape[1] - NEW - 1, ids.shape[1] - 1)  # the positions that drew the NEW tokens
    full = forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    gap = float(np.abs(np.asarray(full)[:, at] - logits).max())
    print(f"gemma4 ({variant}) KV cache: max |logits diff| vs recompute {gap:.2e}")
    assert gap < 1e-4


def test_grpo_rollout_greedy_equals_transformers(gen):
    """G = 2: the prompt's keys and values (both layer types) repeated for both completions, decoded in one
    compiled loop with the scanned step (`split_layers` off, the GPU's way)."""
    model, ref, _, _ = gen["plain"]
    ids, mask = left_pad(PROMPTS, PAD)
    out = rollout(
        model.params, model.config, None, 1.0, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
        num_generations=2, max_new_tokens=NEW, temperature=0.0, pad_id=PAD, split_layers=False,
    )  # fmt: skip
    got = np.asarray(out.completions)
    assert np.array_equal(got[::2], ref) and np.array_equal(got[1::2], ref)


def test_sampled_rollout_on_per_layer_arrays_samples_generate_s_tokens(gen):
    """With an adapter and temperature 0.7, decoding on per-layer weights, adapters and cache
    (`split_layers`, the CPU's default; a KV-shared layer reading its source's new entry): the rollout
    samples the tokens `generate` (the scanned step) samples (G = 1, one seed)."""
    model, _, _, _ = gen["k_eq_v"]
    cfg, temp = model.config, 0.7
    ids, mask = left_pad(PROMPTS, PAD)
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = randomized(init_lora(cfg, lc, jax.random.key(0)), seed=1, std=0.3)
    scale = jnp.asarray(lora_scale(cfg, lc))
    out = rollout(
        model.params, cfg, lora, scale, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5),
        num_generations=1, max_new_tokens=NEW, temperature=temp, pad_id=PAD, split_layers=True,
    )  # fmt: skip
    want = generate(model.params, cfg, PROMPTS, NEW, eos_ids=(), temperature=temp, seed=5, lora=lora,
                    lora_scale=scale)  # fmt: skip
    assert np.asarray(out.completions).tolist() == want


def test_multimodal_gemma4_text_tower_generates_as_transformers(tmp_path):
    """A `Gemma4ForConditionalGeneration` checkpoint (model_type gemma4, its text tower k_eq_v) generates
    as transformers' `generate` does on the same left-padded text prompts; here with the layers unrolled
    (`scan_layers` off)."""
    ids, mask = left_pad(PROMPTS, PAD)
    hf = make_hf_gemma4(tmp_path)
    model = load_model(tmp_path)
    new = generate(model.params, model.config.with_runtime(scan_layers=False), PROMPTS, NEW, eos_ids=())
    assert np.array_equal(np.asarray(new), hf_greedy(hf, ids, mask, NEW))
