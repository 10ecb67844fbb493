"""Tiny random Hugging Face models of every supported family, built with transformers for the tests,
and the padded batch the parity tests feed them."""

import shutil
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llama", "llama_tied_mqa", "mistral", "qwen2", "qwen3", "gpt2")
# The families of tests/test_families.py (one module-scoped model each, not run through every test above).
NEW_FAMILIES = ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3", "smollm3", "gpt_oss")
# Mixture-of-experts families (tests/test_moe.py): 8 experts, top-2.
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
# Hybrid (Gated DeltaNet + gated attention) families: tests/test_qwen35.py, tests/test_qwen35_moe.py.
HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text")
# stories260K's tokenizer, copied beside a tiny checkpoint that a run trains on
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def hf_config(family: str):
    """A small transformers config that still exercises the family's switches."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":  # GQA, head_dim != hidden/heads, biases, llama3 rope scaling
        return LlamaConfig(
            **common,
            num_key_value_heads=2,
            head_dim=12,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    if family == "llama_tied_mqa":  # MQA, tied embeddings, linear rope scaling
        return LlamaConfig(
            **common,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        )
    if family == "mistral":  # sliding window shorter than the test sequence
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=4)
    if family == "qwen2":  # q/k/v bias, tied
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":  # q/k RMSNorm, explicit head_dim
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if family in NEW_FAMILIES or family in MOE_FAMILIES or family in HYBRID_FAMILIES:
        return _new_family_config(family, common)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
    raise ValueError(family)


def _new_family_config(family: str, common: dict):
    """Tiny configs of the families past Llama, each exercising what it adds (docs/families.md). Vocab 512
    (stories260K's tokenizer), so the same checkpoints also train in tests/test_families.py."""
    from transformers import AutoConfig

    common = {**common, "vocab_size": 512, "max_position_embeddings": 128}
    if family == "gemma":  # (1 + w) norms, sqrt(D) embeddings, GeGLU, head_dim != D / N, MQA, tied
        return AutoConfig.for_model("gemma", **common, num_key_value_heads=1, head_dim=16)
    if family == "gemma2":  # soft-caps, sliding/global layers (window 4 < sequence), post-norms, scalar
        return AutoConfig.for_model(
            "gemma2",
            **common,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.0,
            sliding_window=4,
        )
    if family == "gemma3_text":  # q/k norms, both layer types, local and global RoPE (global scaled)
        return AutoConfig.for_model(
            "gemma3_text",
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=12,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            },
        )
    if family == "phi3":  # fused qkv/gate_up, partial rotary (4 of 8 dims), longrope (original 32)
        return AutoConfig.for_model(
            "phi3",
            **common,
            num_key_value_heads=2,
            pad_token_id=0,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.7],
                "long_factor": [2.5, 4.0],
                "factor": 2.0,
                "original_max_position_embeddings": 32,
            },
        )
    if family == "olmo2":  # post-norms only, q/k norms over the whole projection
        return AutoConfig.for_model("olmo2", **common, num_key_value_heads=2)
    if family == "olmo3":  # 3 sliding layers (window 4) then a full one; YaRN on the full one only
        return AutoConfig.for_model(
            "olmo3",
            **{**common, "num_hidden_layers": 4},
            num_key_value_heads=2,
            sliding_window=4,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            },
        )
    if family == "smollm3":  # layer 1 has no RoPE and a sliding window of 4
        return AutoConfig.for_model(
            "smollm3",
            **common,
            num_key_value_heads=2,
            pad_token_id=0,
            no_rope_layers=[1, 0],
            use_sliding_window=True,
            sliding_window=4,
        )
    if family == "gpt_oss":  # sinks, sliding (window 4) then full, YaRN, 8 biased experts top-2
        return AutoConfig.for_model(
            "gpt_oss",
            **{**common, "intermediate_size": 24},
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 32,
            },
        )
    if family == "mixtral":  # renormalized top-2 of 8, GQA, a sliding window of 4
        return AutoConfig.for_model(
            "mixtral",
            **common,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
        )
    if family == "qwen3_moe":  # top-2 of 8 without renormalization, expert width != intermediate, q/k norms
        return AutoConfig.for_model(
            "qwen3_moe",
            **common,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=False,
        )
    if family == "qwen3_5_text":  # hybrid: 2 DeltaNet layers, 1 gated attention, twice; partial RoPE
        return AutoConfig.for_model(
            "qwen3_5_text",
            **{**common, "num_hidden_layers": 6},
            layer_types=["linear_attention", "linear_attention", "full_attention"] * 2,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        )
    if family == "qwen3_5_moe_text":  # DeltaNet then gated attention, twice; 4 experts top-2, shared expert
        return AutoConfig.for_model(
            "qwen3_5_moe_text",
            **{**common, "num_hidden_layers": 4},
            layer_types=["linear_attention", "full_attention"] * 2,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
        )
    if family == "qwen2_moe":  # q/k/v biases, top-2 of 8 unrenormalized, a gated shared expert of width 40
        return AutoConfig.for_model(
            "qwen2_moe",
            **common,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
        )
    raise ValueError(family)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter non-trivial random values (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_norm = "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f")
            p.copy_(1.0 + noise if is_norm and p.ndim == 1 and "bias" not in name else noise)


def make_hf_model(family: str, folder: Path, seed: int = 0, **overrides):
    """Build, randomize and `save_pretrained` a tiny model; return the torch model (eval, float32).

    `overrides` set config attributes (e.g. num_key_value_heads) after the family's tiny config is made.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    if family == "gpt_oss":  # gate/up pre-activations past swiglu_limit (7), so the clamps matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj.mul_(6.0)
    if family in HYBRID_FAMILIES:
        one_plus_w_(model)
    model.eval()
    model.save_pretrained(folder)
    return model


def one_plus_w_(model: torch.nn.Module) -> None:
    """Qwen3.5's RMSNorms scale by (1 + w): shift their weights to near 0 (as trained checkpoints hold them)
    so that the scales stay near 1, like the other families'; the DeltaNet's gated norm uses w as is."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "linear_attn" not in name:
                p.sub_(1.0)


def make_hf_gemma3(folder: Path, seed: int = 0):
    """A tiny `Gemma3ForConditionalGeneration` (model_type gemma3): the gemma3_text config above as its
    text tower plus a one-layer SigLIP vision tower, randomized and saved; returns the torch model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=hf_config("gemma3_text").to_dict(), vision_config=vision, mm_tokens_per_image=4
    )
    config._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(config)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


def make_hf_qwen3_5(folder: Path, seed: int = 0):
    """A tiny `Qwen3_5ForConditionalGeneration` (model_type qwen3_5): the qwen3_5_text config above as its
    text tower plus a one-block vision tower, randomized and saved; returns the torch model."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    text = hf_config("qwen3_5_text")
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size,
        patch_size=14, num_position_embeddings=16,
    )  # fmt: skip
    config = Qwen3_5Config(text_config=text.to_dict(), vision_config=vision)
    config._attn_implementation = "eager"
    model = Qwen3_5ForConditionalGeneration(config)
    randomize_(model, seed)
    one_plus_w_(model.model.language_model)
    model.eval()
    model.save_pretrained(folder)
    return model


def make_hf_qwen3_5_moe(folder: Path, seed: int = 0):
    """A tiny `Qwen3_5MoeForConditionalGeneration` (model_type qwen3_5_moe): the qwen3_5_moe_text config
    above as its text tower plus a one-block vision tower, randomized and saved; returns the torch model."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    text = hf_config("qwen3_5_moe_text")
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size,
        patch_size=14, num_position_embeddings=16,
    )  # fmt: skip
    config = Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision)
    config._attn_implementation = "eager"
    model = Qwen3_5MoeForConditionalGeneration(config)
    randomize_(model, seed)
    one_plus_w_(model.model.language_model)
    model.eval()
    model.save_pretrained(folder)
    return model


def copy_tokenizer(src: Path, folder: Path) -> None:
    """Copy the tokenizer files of `src` (stories260K) into the checkpoint folder `folder`."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, folder / name)


def model_cache(tmp_path_factory, tokenizer_from: Path | None = None):
    """For a module-scoped fixture: `get(family, **overrides)` -> (folder, torch model, jaxlora Model), each
    built (`make_hf_model`, with `tokenizer_from`'s tokenizer beside it if given) and loaded once."""
    from jaxlora.models import load_model

    cache: dict = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(family)
            hf = make_hf_model(family, folder, **overrides)
            if tokenizer_from is not None:
                copy_tokenizer(tokenizer_from, folder)
            cache[key] = (folder, hf, load_model(folder))
        return cache[key]

    return get


def hf_forward(hf: torch.nn.Module, ids, mask, pos, **kw):
    """The torch model's output on a padded batch: ids, mask, pos [B, T] numpy arrays."""
    with torch.no_grad():
        return hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
            **kw,
        )


def padded_batch(vocab: int, seq: int = 12):
    """Three rows: full, right-padded, left-padded; returns ids, mask, positions as numpy."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(3, seq)).astype(np.int32)
    mask = np.ones((3, seq), np.int32)
    mask[1, -4:] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    positions[1] = np.arange(seq)
    return ids, mask, positions
