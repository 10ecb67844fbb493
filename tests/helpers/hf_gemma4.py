"""Tiny random Gemma 4 text models built with transformers (tests/test_gemma4.py): 4 layers, sliding and full
layers alternating, the last 2 KV-shared, PLE, proportional RoPE on the full layers (half their head dim),
a full head dim twice the sliding one, final soft-capping; `k_eq_v` gives the full layers one kv head
whose keys are the values too."""

from pathlib import Path

import torch

from tests.helpers.hf_tiny import copy_tokenizer, randomize_

TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma4_config(k_eq_v: bool = False, **over):
    from transformers import AutoConfig

    keys = dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        max_position_embeddings=128,
        sliding_window=4,
        layer_types=TYPES,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=512,
        hidden_size_per_layer_input=8,
        final_logit_softcapping=10.0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        },
    )
    if k_eq_v:
        keys.update(attention_k_eq_v=True, num_global_key_value_heads=1)
    if over.get("enable_moe_block"):  # the MoE block adds to the MLP's output: keep the sum's scale near 1
        keys.update(intermediate_size=24)
    return AutoConfig.for_model("gemma4_text", **{**keys, **over})


def randomize_gemma4_(model: torch.nn.Module, seed: int) -> None:
    """Random weights (norms near 1, `randomize_`) and layer scalars near 1."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.2 * torch.randn(b.shape, generator=g))


def make_gemma4(folder: Path, tokenizer_from: Path | None = None, seed: int = 0, **kw):
    """Build, randomize and save a tiny `Gemma4ForCausalLM` (kw: `gemma4_config`'s); returns it (eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gemma4_config(**kw), attn_implementation="eager")
    randomize_gemma4_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, folder)
    return model


def make_hf_gemma4(folder: Path, seed: int = 0):
    """A tiny `Gemma4ForConditionalGeneration` (model_type gemma4): the k_eq_v config above as its text
    tower plus a one-layer vision tower (no audio tower), randomized and saved; returns the torch model."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
    )  # fmt: skip
    text = gemma4_config(k_eq_v=True, use_bidirectional_attention="vision")
    config = Gemma4Config(text_config=text.to_dict(), vision_config=vision, audio_config=None)
    config._attn_implementation = "eager"
    model = Gemma4ForConditionalGeneration(config)
    randomize_gemma4_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model
