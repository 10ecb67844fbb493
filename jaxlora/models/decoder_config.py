"""`DecoderConfig`: the one set of switches every supported decoder family is read into, and how it runs.

Built from a Hugging Face `config.json` by `jaxlora.models.config.config_from_hf`, never from a preset
table; the run-time choices are a `Runtime` (`jaxlora.models.runtime`) inside it.
"""

import dataclasses

from jaxlora.models.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What the decoder is, read from `config.json` (`jaxlora.models.config.config_from_hf`), and how it
    runs (`runtime`, set with `with_runtime`).

    Hashable, so it is passed to jitted functions as a static argument.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    # "rms" (Llama family) or "layer" (GPT-2).
    norm: str = "rms"
    # "silu" gated MLP (gate/up/down), "gelu_tanh" gated (Gemma's GeGLU) or "gelu_new" plain MLP (GPT-2).
    activation: str = "silu"
    # Gemma: RMSNorm scales by (1 + w) (norm_offset 1.0) and embeddings are times sqrt(hidden).
    norm_offset: float = 0.0
    embed_scale: bool = False
    # Where the layer norms sit: before attention and MLP (pre_norm, most families) and/or on their
    # outputs before the residual add (post_norm: Gemma 2/3 have both, OLMo 2 only post).
    pre_norm: bool = True
    post_norm: bool = False
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head q/k RMSNorm [H] (Qwen3, Gemma 3)
    qk_norm_full: bool = False  # OLMo 2: q/k RMSNorm over the whole projection [N*H], [K*H]
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, gate first (fused_qkv: its qkv_proj)
    # GPT-2 switches: learned absolute positions, fused c_attn, Conv1D layout.
    learned_positions: bool = False
    fused_qkv: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    # Phi-3 longrope: per-frequency divisors below/above rope_original_max_positions, cos/sin factor.
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0  # longrope and YaRN: cos and sin times this (global layers)
    # YaRN: the ramp between interpolated and original frequencies, over the dims whose rotations in
    # rope_original_max_positions lie between beta_fast and beta_slow (bounds rounded out with truncate).
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    # RoPE turns the first rotary_dim dims of a head only (Phi-3 partial_rotary_factor); 0 = head_dim.
    rotary_dim: int = 0
    # Gemma 3, Olmo 3: the RoPE base of local (sliding) layers, default scaling; 0 = no local RoPE.
    rope_local_theta: float = 0.0
    # Per layer: "global" RoPE, "local" RoPE (rope_local_theta) or "none" (SmolLM3's NoPE layers);
    # empty = all global.
    layer_rope: tuple[str, ...] = ()
    # Per layer: 0 = full attention, w > 0 = attend to the last w positions only.
    sliding_windows: tuple[int, ...] = ()
    # Gemma 2's attention-logit soft-capping: scores -> c * tanh(scores / c); 0 = none.
    attn_logit_softcap: float = 0.0
    # Gemma 2: final-logit soft-capping, logits -> c * tanh(logits / c); 0 = none.
    final_logit_softcap: float = 0.0
    # Attention score scale; 0 = 1 / sqrt(head_dim). Gemma 2/3: query_pre_attn_scalar ** -0.5.
    attn_scale: float = 0.0
    # gpt-oss: a learned logit per query head (`self_attn.sinks` [N]) joins each softmax's denominator.
    attn_sinks: bool = False
    # Mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE): 0 experts = the dense MLP. Each token goes to its
    # top `experts_per_token` experts by router softmax, weights renormalized to sum 1 with
    # `norm_topk_prob`; each expert is a SwiGLU MLP of width `moe_intermediate_size`.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0  # HF's load-balancing loss weight (used when training asks for it)
    # gpt-oss experts (swiglu_alpha > 0): gate/up columns interleaved (gate = [..., ::2]) and the clamped
    # SwiGLU: gate <= limit, -limit <= up <= limit, (up + 1) * gate * sigmoid(alpha * gate). 0 = Mixtral's
    # SwiGLU, gate columns first. (Expert biases are used where the checkpoint has them.)
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0
    # Qwen2-MoE: a SwiGLU shared expert of this width on every token, its output times
    # sigmoid(shared_expert_gate(x)), added to the routed experts'; 0 = none.
    shared_expert_intermediate_size: int = 0
    # Qwen3.5's hybrid layers: per layer "linear_attention" (Gated DeltaNet, `models.deltanet`) or
    # "full_attention"; empty = attention everywhere. Each kind's mixer weights are stacked apart
    # (`models.hybrid`). The DeltaNet sizes: key/value heads, their head dims, the conv width.
    mixers: tuple[str, ...] = ()
    linear_heads: tuple[int, int] = (0, 0)
    linear_head_dims: tuple[int, int] = (0, 0)
    linear_conv_kernel: int = 4
    # Qwen3.5's attention: q_proj emits [query; gate] per head, the output is times sigmoid(gate).
    attn_output_gate: bool = False
    # Gemma 4 (`models.gemma4_spec`): the full layers' head dim and kv heads (0: not Gemma 4), their keys
    # used as values too (`attention_k_eq_v`); per-layer input embeddings of width `ple_dim` (0 = none)
    # from a table of `ple_vocab` rows. Its KV-shared layers are its `mixers` without "+".
    global_head_dim: int = 0
    global_kv_heads: int = 0
    k_eq_v: bool = False
    ple_dim: int = 0
    ple_vocab: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The multimodal model_type (`models.families.TEXT_TOWERS`) when this decoder is the text tower of such
    # a checkpoint: its weights sit under `language_model` (jaxlora.models.checkpoint_names), vision unused.
    text_tower_of: str = ""
    # How it runs (compute dtype, attention kernel, remat...): not part of the checkpoint.
    runtime: Runtime = Runtime()

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_dim(self) -> int:
        """How many dims of each head RoPE turns (even)."""
        return self.rotary_dim or self.head_dim

    def with_runtime(self, **kw) -> "DecoderConfig":
        """A copy with run-time fields changed (compute_dtype, attention, packed, remat...), checked."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **kw))
