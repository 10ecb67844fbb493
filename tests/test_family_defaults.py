"""A key that `config.json` leaves out reads as transformers' default for the family (`GENERIC` in
`jaxlora.models.family_defaults`, each family's `defaults` in `jaxlora.models.families`), checked against
each family's transformers config class."""

import dataclasses
import json

import jax
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from jaxlora.models import config_from_hf, load_model
from jaxlora.models.config import SUPPORTED_MODEL_TYPES
from jaxlora.models.families import FAMILIES, hf_value
from jaxlora.models.family_defaults import GENERIC
from jaxlora.models.random_weights import init_params
from jaxlora.quant import count_params

# the keys GPT-2 reads (its sizes have names of their own: n_embd, n_positions...)
GPT2_KEYS = (
    "activation_function",
    "n_inner",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)
# read as `hf.get(key)`, absent meaning off or derived from other keys (not in the tables)
BARE_KEYS = (
    "layer_types",
    "no_rope_layers",
    "mlp_only_layers",
    "router_jitter_noise",
    "use_bidirectional_attention",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)
MISSING = object()
FAMILY_DEFAULTS = {mt: fam.defaults for mt, fam in FAMILIES.items()}
GEMMA3_TEXT_TOWER = FAMILIES["gemma3_text"].text_config_defaults


def transformers_default(mt: str, key: str):
    """What `mt`'s transformers config class takes for `key` when it is not given, or MISSING."""
    cls = CONFIG_MAPPING[mt]
    if mt == "gpt2" and key not in GPT2_KEYS:
        return MISSING
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key == "num_experts" and "num_local_experts" in fields:  # Mixtral's name for it
        key = "num_local_experts"
    if key in fields:
        f = fields[key]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    made = cls()  # RoPE settings and Gemma 3's pattern are set when the class is built
    rope = made.rope_parameters or {}
    if mt in ("gemma3_text", "olmo3"):  # RoPE per layer type
        rope = rope["sliding_attention" if key == "rope_local_base_freq" else "full_attention"]
        if key == "sliding_window_pattern" and mt == "gemma3_text":
            return made._sliding_window_pattern
    elif key == "rope_local_base_freq":
        return MISSING
    return rope.get(key, MISSING)


def test_every_supported_family_has_a_table_entry():
    assert set(FAMILY_DEFAULTS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
def test_defaults_equal_transformers(mt):
    checked = []
    for key in {**GENERIC, **FAMILY_DEFAULTS[mt]}:
        expected = transformers_default(mt, key)
        if key in FAMILY_DEFAULTS[mt]:
            assert expected is not MISSING, f"{mt}: the table lists {key}, which transformers does not define"
        if expected is not MISSING:
            assert hf_value({"model_type": mt}, key) == expected, (mt, key)
            checked.append(key)
    print(f"{mt}: {len(checked)} defaults equal transformers': {', '.join(sorted(checked))}")


def test_gemma3_text_tower_defaults_equal_transformers():
    for key, value in GEMMA3_TEXT_TOWER.items():
        assert transformers_default("gemma3_text", key) == value, key


@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
def test_keys_read_bare_are_off_in_transformers_too(mt):
    """Keys read without a default (absent = off or derived) have a falsy default in transformers."""
    for key in BARE_KEYS:
        default = transformers_default(mt, key)
        assert default is MISSING or not default, (mt, key, default)


def _minimal(mt: str) -> dict:
    """Only the keys jaxlora cannot go without (30 layers, so that layer patterns show)."""
    if mt == "gpt2":
        return dict(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    hf = dict(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=4
    )
    return {**hf, "moe_intermediate_size": 32} if mt in ("qwen3_moe", "qwen2_moe", "qwen3_5_moe_text") else hf


def _no_token_ids(cfg):  # jaxlora leaves absent token ids to the tokenizer (see family_defaults)
    return dataclasses.replace(cfg, bos_token_id=None, eos_token_ids=(), pad_token_id=None)


SLIDING = {"plain": {}, "use_sliding_window": {"use_sliding_window": True}}
SLIDING["window_8"] = {**SLIDING["use_sliding_window"], "sliding_window": 8}


@pytest.mark.parametrize("sliding", SLIDING)
@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
def test_a_config_without_optional_keys_reads_as_transformers_writes_it(mt, sliding):
    """The keys left out are read as the ones transformers writes for the same file: everything in
    `DecoderConfig` that follows from them (head_dim, GQA, windows per layer, RoPE, experts) agrees."""
    hf = _minimal(mt) | SLIDING[sliding]
    written = AutoConfig.for_model(mt, **hf).to_dict()
    assert _no_token_ids(config_from_hf({"model_type": mt, **hf})) == _no_token_ids(config_from_hf(written))


# Real SmolLM3-3B config.json keys (HuggingFaceTB/SmolLM3-3B), which has no tie_word_embeddings key.
SMOLLM3_3B = dict(
    model_type="smollm3",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=4,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=65536,
    rope_theta=5_000_000.0,
    rope_scaling=None,
    no_rope_layer_interval=4,
    attention_bias=False,
    mlp_bias=False,
    use_sliding_window=False,
    sliding_window=None,
)


def test_smollm3_without_tie_key_ties_its_head_and_counts_as_transformers():
    cfg = config_from_hf(SMOLLM3_3B)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 5e6
    ours = count_params(jax.eval_shape(lambda: init_params(cfg)))
    hf_cfg = AutoConfig.for_model(**SMOLLM3_3B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    theirs = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    print(f"SmolLM3-3B: {ours:,} parameters (transformers: {theirs:,})")
    assert ours == theirs
    untied_cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    untied = count_params(jax.eval_shape(lambda: init_params(untied_cfg)))
    assert untied - ours == 128256 * 2048 == 262_668_288  # what an untied head would have added


def test_tied_smollm3_checkpoint_without_tie_key_loads(tmp_path):
    from tests.helpers.hf_tiny import make_hf_model

    make_hf_model("smollm3", tmp_path, tie_word_embeddings=True)  # saved without lm_head.weight
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    del hf["tie_word_embeddings"]
    path.write_text(json.dumps(hf))
    assert load_model(tmp_path).config.tie_word_embeddings
