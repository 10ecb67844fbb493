"""What a key that `config.json` leaves out stands for: transformers' default for the family.

transformers builds a model from its config class, so a key the file omits takes that class's default, and
the defaults differ between families (SmolLM3 ties its head, Mixtral's RoPE base is 1e6). `HFConfig.value`
reads a key the same way: the file's value where the key is there (even null), else the family's
`defaults` (its entry in `jaxlora.models.families`), else `GENERIC`. `tests/test_family_defaults.py` checks
both against transformers.

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
    "swiglu_alpha": None,  # gpt-oss's clamped SwiGLU
    "swiglu_limit": None,
    "original_max_position_embeddings": None,  # Phi-3 longrope
    "activation_function": "gelu_new",  # GPT-2
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
}


class HFConfig(dict):
    """A `config.json` dict that knows its family's defaults (`models.families.Family.defaults`).

    `hf[key]` and `hf.get(key)` read the file as written (keys read bare, see the module docstring);
    `hf.value(key)` reads a key with a default: the file's value where it has the key (null included),
    else the family's default, else `GENERIC`.
    """

    def __init__(self, raw: dict, defaults: dict | None = None):
        super().__init__(raw)
        self.defaults = dict(defaults or {})

    def value(self, key: str):
        if key in self:
            return self[key]
        return self.defaults[key] if key in self.defaults else GENERIC[key]  # a family's own keys: no GENERIC

    @property
    def model_type(self) -> str:
        return self["model_type"]
