"""Tiny random Hugging Face models of every supported family, built with transformers for the tests."""

from pathlib import Path

import torch

FAMILIES = ("llama", "llama_tied_mqa", "mistral", "qwen2", "qwen3", "gpt2")


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
    if family == "gpt2":
        return GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
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


def make_hf_model(family: str, folder: Path, seed: int = 0):
    """Build, randomize and `save_pretrained` a tiny model; return the torch model (eval, float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model
