"""`DecoderConfig`: the one set of switches every supported decoder family is read into.

Built from a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters`), never from a preset table.
"""

import dataclasses
import json
from pathlib import Path

import jax

from jaxlora.errors import UserError
from jaxlora.models.family_defaults import GEMMA3_TEXT_TOWER, hf_value
from jaxlora.models.layer_settings import (
    eos_ids,
    layer_rope,
    rope_settings,
    sliding_windows,
)

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "smollm3",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
)
# a mixture-of-experts MLP in every layer (jaxlora.models.moe); Qwen2-MoE adds a gated shared expert
MOE_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
MOE_IMPLS = ("auto", "ragged", "dense")  # see DecoderConfig.moe_impl
GEMMAS = ("gemma", "gemma2", "gemma3_text")
# Multimodal checkpoints read as their text tower: model_type -> the model_type of its `text_config`.
TEXT_TOWERS = {"gemma3": "gemma3_text"}
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # see jaxlora.models.attention
REMAT_POLICIES = ("none", "lean", "dots", "full")  # what each keeps: `jaxlora.models.decoder.REMAT`
LORA_PRODUCTS = ("plain", "cpu", "auto")  # see DecoderConfig.lora_product


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture switches plus run-time choices (attention kernel, compute dtype, remat).

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
    rope_attention_factor: float = 1.0
    # RoPE turns the first rotary_dim dims of a head only (Phi-3 partial_rotary_factor); 0 = head_dim.
    rotary_dim: int = 0
    # Gemma 3: the RoPE base of local (sliding) layers, default scaling; 0 = no local RoPE.
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
    # Mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE): 0 experts = the dense MLP. Each token goes to its
    # top `experts_per_token` experts by router softmax, weights renormalized to sum 1 with
    # `norm_topk_prob`; each expert is a SwiGLU MLP of width `moe_intermediate_size`.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0  # HF's load-balancing loss weight (used when training asks for it)
    # Qwen2-MoE: a SwiGLU shared expert of this width on every token, its output times
    # sigmoid(shared_expert_gate(x)), added to the routed experts'; 0 = none.
    shared_expert_intermediate_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Run-time choices, not part of the checkpoint.
    compute_dtype: str = "float32"
    # One of ATTENTION_IMPLS; "auto" is resolved per case at trace time (jaxlora.models.attention.choose).
    attention: str = "auto"
    # True when training rows may hold several packed examples (data.packing): cuDNN then cannot run.
    # False: one example per row, right-padded (segment ids 1 then 0).
    packed: bool = True
    # What the backward pass keeps and what it recomputes; one of REMAT_POLICIES.
    remat: str = "lean"
    # The LoRA product (x @ A) @ B: "plain" under autodiff, "cpu" with the backward pass written for
    # XLA:CPU (`jaxlora.models.lora_product`), "auto" = "cpu" when JAX runs on the CPU, else "plain".
    lora_product: str = "auto"
    # False: a Python loop over the layers instead of `lax.scan` (compile time grows with depth).
    scan_layers: bool = True
    # Experts: "ragged" sorts tokens by expert and runs a grouped matmul (`lax.ragged_dot`), "dense" runs
    # every expert on every token and keeps the routed ones (cheaper for a handful of tiny experts),
    # "auto" = dense on the CPU or for at most 8 experts of width <= 256, else ragged (jaxlora.models.moe).
    moe_impl: str = "auto"
    # The multimodal model_type (TEXT_TOWERS) when this decoder is the text tower of such a checkpoint:
    # its weights sit under `language_model` (jaxlora.models.checkpoint_names), vision weights unused.
    text_tower_of: str = ""
    # The backend the step is traced for: "" = the one JAX runs on here; "gpu" traces the GPU code paths
    # (attention kernels, LoRA product, experts) on any machine, to lower or plan a GPU step on a CPU.
    backend: str = ""

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
        """A validated copy with run-time fields changed (compute_dtype, attention, packed, remat...)."""
        cfg = dataclasses.replace(self, **kw)
        if cfg.attention not in ATTENTION_IMPLS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {cfg.attention!r}")
        if cfg.remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {cfg.remat!r}")
        if cfg.lora_product not in LORA_PRODUCTS:
            raise UserError(
                f"lora_product must be one of {', '.join(LORA_PRODUCTS)}, got {cfg.lora_product!r}"
            )
        if cfg.moe_impl not in MOE_IMPLS:
            raise UserError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}, got {cfg.moe_impl!r}")
        if cfg.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"compute_dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")
        if cfg.backend not in ("", "cpu", "gpu"):
            raise UserError(f"backend must be cpu or gpu (or empty for JAX's own), got {cfg.backend!r}")
        return cfg

    @property
    def target_backend(self) -> str:
        """`backend`, or the backend JAX runs on here ("cpu", "gpu", "tpu")."""
        return self.backend or jax.default_backend()


def _family_switches(hf: dict) -> dict:
    """The switches of the families past Llama: norms, activation, fused modules, soft-caps, scale."""
    mt = hf["model_type"]
    act = hf_value(hf, "hidden_act")
    if mt in ("gemma2", "gemma3_text"):
        act = hf_value(hf, "hidden_activation") or act
    if mt in GEMMAS and act == "gelu":  # legacy Gemma value meaning the tanh approximation (as HF reads it)
        act = "gelu_pytorch_tanh"
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in acts:
        raise UserError(
            f"config.json: hidden_act {act!r} is not supported for {mt}; supported: {', '.join(acts)}"
        )
    out: dict = {"activation": acts[act]}
    if mt in GEMMAS:
        out.update(norm_offset=1.0, embed_scale=True)
    if mt in ("gemma2", "gemma3_text"):
        if hf.get("use_bidirectional_attention"):
            raise UserError("config.json: use_bidirectional_attention is not supported (causal LM only)")
        out.update(post_norm=True, qk_norm=mt == "gemma3_text")
        out["attn_logit_softcap"] = float(hf_value(hf, "attn_logit_softcapping") or 0.0)
        out["final_logit_softcap"] = float(hf_value(hf, "final_logit_softcapping") or 0.0)
        out["attn_scale"] = float(hf_value(hf, "query_pre_attn_scalar") or 256) ** -0.5
    if mt == "olmo2":
        out.update(pre_norm=False, post_norm=True, qk_norm_full=True)
    if mt == "phi3":
        out.update(fused_qkv=True, fused_gate_up=True)
    if mt in MOE_TYPES:
        out.update(_moe_switches(hf))
    return out


def _moe_switches(hf: dict) -> dict:
    """Mixtral's, Qwen3-MoE's and Qwen2-MoE's experts: count, top-k, renormalization, width, aux-loss
    weight, and Qwen2-MoE's shared expert."""
    mt = hf["model_type"]
    experts = hf.get("num_local_experts") or hf_value(hf, "num_experts")  # transformers 5 / hub Qwen3-MoE
    if not experts or experts < 2:
        raise UserError(f"config.json: {mt} needs at least 2 experts, got {experts!r}")
    top_k = int(hf_value(hf, "num_experts_per_tok"))
    if not 1 <= top_k <= experts:
        raise UserError(f"config.json: num_experts_per_tok {top_k} must be between 1 and {experts}")
    if mt != "mixtral" and (hf.get("mlp_only_layers") or hf_value(hf, "decoder_sparse_step") != 1):
        raise UserError(
            f"config.json: {mt} with dense layers (mlp_only_layers, decoder_sparse_step != 1) is not "
            "supported; every layer must be a mixture of experts"
        )
    if hf.get("router_jitter_noise"):
        raise UserError("config.json: router_jitter_noise is not supported; set it to 0")
    width = hf["intermediate_size"] if mt == "mixtral" else hf["moe_intermediate_size"]
    out = {
        "num_experts": int(experts),
        "experts_per_token": top_k,
        "norm_topk_prob": True if mt == "mixtral" else bool(hf_value(hf, "norm_topk_prob")),
        "moe_intermediate_size": int(width),
        "router_aux_loss_coef": float(hf_value(hf, "router_aux_loss_coef")),
    }
    if mt == "qwen2_moe":
        shared = hf_value(hf, "shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared < 1:
            raise UserError(
                f"config.json: qwen2_moe needs shared_expert_intermediate_size >= 1, got {shared!r}"
            )
        out["shared_expert_intermediate_size"] = shared
    return out


def _qkv_bias(hf: dict) -> bool:
    """q/k/v biases: always in Qwen2, Qwen2-MoE's `qkv_bias` (default true), else `attention_bias`."""
    mt = hf["model_type"]
    if mt == "qwen2_moe":
        return bool(hf_value(hf, "qkv_bias"))
    return mt == "qwen2" or bool(hf_value(hf, "attention_bias"))


def config_from_hf(hf: dict) -> DecoderConfig:
    """Map a Hugging Face `config.json` dict to a `DecoderConfig`."""
    mt = hf.get("model_type")
    if mt in TEXT_TOWERS:
        return dataclasses.replace(config_from_hf(_text_config(hf)), text_tower_of=mt)
    if mt not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join((*SUPPORTED_MODEL_TYPES, *TEXT_TOWERS))
        raise UserError(f"config.json: model_type {mt!r} is not supported; supported: {supported}")
    common = dict(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
    if mt == "gpt2":
        d, n = hf["n_embd"], hf["n_head"]
        act = hf_value(hf, "activation_function")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"config.json: GPT-2 activation_function {act!r} is not supported; use gelu_new")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError(
                "config.json: GPT-2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported"
            )
        layers = hf["n_layer"]
        return DecoderConfig(
            **common,
            hidden_size=d,
            intermediate_size=hf_value(hf, "n_inner") or 4 * d,
            num_layers=layers,
            num_heads=n,
            num_kv_heads=n,
            head_dim=d // n,
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf_value(hf, "layer_norm_epsilon"),
            norm="layer",
            activation="gelu_new",
            tie_word_embeddings=hf_value(hf, "tie_word_embeddings"),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            learned_positions=True,
            fused_qkv=True,
            sliding_windows=(0,) * layers,
        )
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    head_dim = hf_value(hf, "head_dim") or hf["hidden_size"] // heads
    switches = _family_switches(hf)
    return DecoderConfig(
        **common,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf_value(hf, "num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=hf_value(hf, "max_position_embeddings"),
        norm_eps=hf_value(hf, "rms_norm_eps"),
        tie_word_embeddings=hf_value(hf, "tie_word_embeddings"),
        qkv_bias=_qkv_bias(hf),
        o_bias=mt != "qwen2" and hf_value(hf, "attention_bias"),
        mlp_bias=hf_value(hf, "mlp_bias"),
        qk_norm=switches.pop("qk_norm", mt in ("qwen3", "qwen3_moe")),
        sliding_windows=sliding_windows(hf, layers),
        layer_rope=layer_rope(hf, layers),
        **switches,
        **rope_settings(hf, head_dim),
    )


def _text_config(hf: dict) -> dict:
    """The text tower's config of a multimodal config.json: `text_config` over the keys it may leave out
    (the rest: `hf_value`), with the token ids and embedding tying of the top level where it sets them."""
    mt = hf["model_type"]
    text = hf.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UserError(f"config.json: model_type {mt!r} needs a text_config with hidden_size")
    top = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
    top = {k: v for k, v in top.items() if v is not None}  # the top level decides these (as transformers)
    return {**GEMMA3_TEXT_TOWER, **text, **top, "model_type": TEXT_TOWERS[mt]}


def read_hf_config(folder: Path) -> dict:
    """Read `config.json` from a model folder, with a one-line error when it is missing or broken."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json found; is this a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
