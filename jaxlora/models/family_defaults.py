"""What a key that `config.json` leaves out stands for: transformers' default for the family.

transformers builds a model from its config class, so a key the file omits takes that class's default, and
the defaults differ between families (SmolLM3 ties its head, Mixtral's RoPE base is 1e6). `hf_value` reads
a key the same way: the file's value where the key is there (even null), else the family's entry in
`FAMILY_DEFAULTS`, else `GENERIC`. `tests/test_family_defaults.py` checks both tables against transformers.

Not listed: keys read bare, where absent means off or derived from other keys, as in transformers
(`layer_types`, `no_rope_layers`, `mlp_only_layers`, `router_jitter_noise`, the GPT-2 attention switches),
and the token ids, which fall back to the tokenizer's rather than to one checkpoint's ids in a class.
"""

# The default of each key read with one, where no family entry says otherwise; None: derived (head_dim =
# hidden_size // num_attention_heads, num_key_value_heads = num_attention_heads, n_inner = 4 * n_embd) or off.
GENERIC = {
    "rope_theta": 10000.0,
    "rope_local_base_freq": 10000.0,  # Gemma 3's sliding layers
    "partial_rotary_factor": 1.0,
    "head_dim": None,
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "qkv_bias": True,  # read for Qwen2-MoE only
    "hidden_act": "silu",
    "hidden_activation": None,  # Gemma 2/3's name; None: hidden_act
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 28,  # the Qwen families'
    "sliding_window_pattern": 6,  # 4.x Gemma 3: every 6th layer global
    "no_rope_layer_interval": 4,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "query_pre_attn_scalar": 256,
    "num_experts": None,  # also read as `num_local_experts` (Mixtral, transformers 5)
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": None,
    "original_max_position_embeddings": None,  # Phi-3 longrope
    "activation_function": "gelu_new",  # GPT-2
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
}

# Where a family's config class differs from GENERIC (only those keys).
FAMILY_DEFAULTS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
    "qwen3": dict(head_dim=128, num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
    "gpt2": dict(tie_word_embeddings=True),
    "gemma": dict(
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        head_dim=256,
        num_key_value_heads=16,
        max_position_embeddings=8192,
    ),
    "gemma2": dict(
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        head_dim=256,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        rope_theta=1_000_000.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        head_dim=256,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        sliding_window=4096,
    ),
    "phi3": dict(rms_norm_eps=1e-5, max_position_embeddings=4096, original_max_position_embeddings=4096),
    "olmo2": dict(rms_norm_eps=1e-5),
    "smollm3": dict(
        rope_theta=2_000_000.0, tie_word_embeddings=True, num_key_value_heads=4, max_position_embeddings=32768
    ),
    "mixtral": dict(
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        num_experts=8,
    ),
    "qwen3_moe": dict(
        num_key_value_heads=4,
        max_position_embeddings=32768,
        sliding_window=4096,
        num_experts=128,
        num_experts_per_tok=8,
    ),
    "qwen2_moe": dict(
        num_key_value_heads=16,
        max_position_embeddings=32768,
        sliding_window=4096,
        num_experts=60,
        num_experts_per_tok=4,
        shared_expert_intermediate_size=5632,
    ),
}

# A multimodal Gemma 3's `text_config` (gemma-3-4b-it lists only a few keys) also leaves out keys read
# without a default; these come from transformers' Gemma3TextConfig, the top level's token ids over them.
GEMMA3_TEXT_TOWER = dict(
    vocab_size=262208, num_attention_heads=8, bos_token_id=2, eos_token_id=1, pad_token_id=0
)


def hf_value(hf: dict, key: str):
    """`hf[key]` where `config.json` has the key (null included), else the family's transformers default."""
    if key in hf:
        return hf[key]
    return FAMILY_DEFAULTS.get(hf.get("model_type"), {}).get(key, GENERIC[key])
