"""Readers: `config.json` (an `HFConfig`, which knows its family's defaults) -> `DecoderConfig` fields.

A family (`jaxlora.models.families`) names its readers: `read` for the sizes and the switches every family
has (Llama's keys, `decoder`; GPT-2's own, `gpt2`), `activation`, `layers` for what changes from layer to
layer (sliding windows, RoPE per layer), and `reads` for keys only some families have (experts,
soft-caps). A reader returns a dict of fields; a new family reuses these and adds one only for a key or a
rule no family has yet.
"""

from jaxlora.errors import UserError
from jaxlora.models.family_defaults import HFConfig
from jaxlora.models.layer_settings import (
    FULL,
    SLIDING,
    every,
    layer_types,
    rope_parameters,
    rope_settings,
    sliding_windows,
)

# config.json's activation names -> DecoderConfig.activation
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

# --- the sizes and common switches --------------------------------------------------------------------------


def decoder(hf: HFConfig) -> dict:
    """Llama's keys: sizes, RMSNorm epsilon, embedding tying, biases (`attention_bias`, `mlp_bias`), RoPE."""
    heads = hf["num_attention_heads"]
    head_dim = hf.value("head_dim") or hf["hidden_size"] // heads
    return dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.value("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=hf.value("max_position_embeddings"),
        norm_eps=hf.value("rms_norm_eps"),
        tie_word_embeddings=hf.value("tie_word_embeddings"),
        qkv_bias=bool(hf.value("attention_bias")),
        o_bias=hf.value("attention_bias"),
        mlp_bias=hf.value("mlp_bias"),
        **rope_settings(hf, head_dim),
    )


def sparse_decoder(hf: HFConfig) -> dict:
    """`decoder` for Qwen3.5-MoE, whose config has no dense MLP width (every layer is a mixture of experts):
    intermediate_size 0."""
    return decoder(HFConfig({**hf, "intermediate_size": 0}, hf.defaults))


def gpt2(hf: HFConfig) -> dict:
    """GPT-2's keys (n_embd, n_head, ...): LayerNorm, learned positions, fused c_attn, biases everywhere."""
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise UserError(
            "config.json: GPT-2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported"
        )
    d, n = hf["n_embd"], hf["n_head"]
    return dict(
        hidden_size=d,
        intermediate_size=hf.value("n_inner") or 4 * d,
        num_layers=hf["n_layer"],
        num_heads=n,
        num_kv_heads=n,
        head_dim=d // n,
        max_position_embeddings=hf["n_positions"],
        norm_eps=hf.value("layer_norm_epsilon"),
        tie_word_embeddings=hf.value("tie_word_embeddings"),
    )


# --- activation ---------------------------------------------------------------------------------------------


def activation(hf: HFConfig) -> dict:
    """`hidden_act`: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)."""
    return _gated(hf, hf.value("hidden_act"))


def gemma_activation(hf: HFConfig) -> dict:
    """Gemma's `hidden_act`, where the legacy "gelu" means the tanh approximation (as HF reads it)."""
    return _gated(hf, _legacy_gelu(hf.value("hidden_act")))


def gemma2_activation(hf: HFConfig) -> dict:
    """Gemma 2/3: `hidden_activation`, else `hidden_act`; "gelu" is the tanh approximation."""
    act = hf.value("hidden_act")
    return _gated(hf, _legacy_gelu(hf.value("hidden_activation") or act))


def gpt2_activation(hf: HFConfig) -> dict:
    """GPT-2's plain MLP: `activation_function` gelu_new (or its equal, gelu_pytorch_tanh)."""
    act = hf.value("activation_function")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"config.json: GPT-2 activation_function {act!r} is not supported; use gelu_new")
    return {"activation": "gelu_new"}


def _legacy_gelu(act):
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _gated(hf: HFConfig, act) -> dict:
    if act not in ACTIVATIONS:
        raise UserError(
            f"config.json: hidden_act {act!r} is not supported for {hf.model_type}; "
            f"supported: {', '.join(ACTIVATIONS)}"
        )
    return {"activation": ACTIVATIONS[act]}


# --- per layer: sliding windows and RoPE --------------------------------------------------------------------


def uniform_layers(hf: HFConfig) -> dict:
    """RoPE on every layer; `sliding_window` on every layer, or on the sliding ones of `layer_types`."""
    n = hf["num_hidden_layers"]
    return {"sliding_windows": sliding_windows(hf, n, layer_types(hf, n)), "layer_rope": ("global",) * n}


def gated_layers(hf: HFConfig) -> dict:
    """As `uniform_layers`, the window only with `use_sliding_window` (Qwen3-MoE)."""
    n = hf["num_hidden_layers"]
    windows = sliding_windows(hf, n, layer_types(hf, n), gated=True)
    return {"sliding_windows": windows, "layer_rope": ("global",) * n}


def qwen_layers(hf: HFConfig) -> dict:
    """Qwen2/Qwen3: with `use_sliding_window`, a window on the layers from `max_window_layers` on."""
    n, first = hf["num_hidden_layers"], hf.value("max_window_layers")
    types = layer_types(hf, n, lambda hf, n: [SLIDING if i >= first else FULL for i in range(n)])
    return {"sliding_windows": sliding_windows(hf, n, types, gated=True), "layer_rope": ("global",) * n}


def hybrid_layers(hf: HFConfig) -> dict:
    """Qwen3.5: `layer_types` of linear_attention (Gated DeltaNet) and full_attention layers (default: every
    `full_attention_interval`-th full), RoPE on the attention layers, no window; the DeltaNet's sizes."""
    n, period = hf["num_hidden_layers"], hf.get("full_attention_interval") or 4
    default = ["linear_attention" if (i + 1) % period else FULL for i in range(n)]
    mixers = tuple(layer_types(hf, n, lambda hf, n: default))
    if len(mixers) != n or not set(mixers) <= {"linear_attention", FULL}:
        raise UserError(
            f"config.json: layer_types must list {n} layers, each linear_attention or full_attention"
        )
    return {
        "mixers": mixers,
        "sliding_windows": (0,) * n,
        "layer_rope": ("global",) * n,
        "linear_heads": (hf.value("linear_num_key_heads"), hf.value("linear_num_value_heads")),
        "linear_head_dims": (hf.value("linear_key_head_dim"), hf.value("linear_value_head_dim")),
        "linear_conv_kernel": hf.value("linear_conv_kernel_dim"),
    }


def qwen2_moe_layers(hf: HFConfig) -> dict:
    """Qwen2-MoE: transformers 5's default layer_types, the even layers below `max_window_layers`."""
    n, last = hf["num_hidden_layers"], hf.value("max_window_layers")
    types = layer_types(hf, n, lambda hf, n: [SLIDING if i % 2 == 0 and i < last else FULL for i in range(n)])
    return {"sliding_windows": sliding_windows(hf, n, types, gated=True), "layer_rope": ("global",) * n}


def smollm3_layers(hf: HFConfig) -> dict:
    """SmolLM3: NoPE layers (`no_rope_layers` 0; by default every `no_rope_layer_interval`-th), and with
    `use_sliding_window` transformers' default layer_types: the window on the layers without RoPE."""
    n, interval = hf["num_hidden_layers"], hf.value("no_rope_layer_interval")
    flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) != n:
        raise UserError(f"config.json: no_rope_layers has {len(flags)} entries for {n} layers")
    rope = tuple("global" if f else "none" for f in flags)
    types = layer_types(hf, n, lambda hf, n: [SLIDING if r == "none" else FULL for r in rope])
    return {"sliding_windows": sliding_windows(hf, n, types, gated=True), "layer_rope": rope}


def gemma2_layers(hf: HFConfig) -> dict:
    """Gemma 2: without `layer_types`, every other layer sliding from the first."""
    n = hf["num_hidden_layers"]
    types = layer_types(hf, n, lambda hf, n: every(2, n))
    return {"sliding_windows": sliding_windows(hf, n, types), "layer_rope": ("global",) * n}


def gemma3_layers(hf: HFConfig) -> dict:
    """Gemma 3: every `sliding_window_pattern`-th layer global (without `layer_types`); the sliding layers
    are local, with their own RoPE base (default scaling only)."""
    n = hf["num_hidden_layers"]
    types = layer_types(hf, n, lambda hf, n: every(hf.value("sliding_window_pattern"), n))
    _, local = rope_parameters(hf)
    if local is not None and (local.get("rope_type") or "default") != "default":
        raise UserError("config.json: only default RoPE is supported for Gemma 3's sliding layers")
    return {
        "sliding_windows": sliding_windows(hf, n, types),
        "layer_rope": tuple("local" if t == SLIDING else "global" for t in types),
        "rope_local_theta": float((local or {}).get("rope_theta", hf.value("rope_local_base_freq"))),
    }


def olmo3_layers(hf: HFConfig) -> dict:
    """Olmo 3: every 4th layer full (without `layer_types`), the others sliding; the full layers take the
    global RoPE (a 4.x `rope_scaling` such as YaRN applies to them only), the sliding ones default RoPE with
    `rope_parameters["sliding_attention"]`'s base, else `rope_theta`."""
    n = hf["num_hidden_layers"]
    types = layer_types(hf, n, lambda hf, n: every(4, n))
    _, local = rope_parameters(hf)
    if local is not None and (local.get("rope_type") or "default") != "default":
        raise UserError("config.json: only default RoPE is supported for Olmo 3's sliding layers")
    return {
        "sliding_windows": sliding_windows(hf, n, types),
        "layer_rope": tuple("local" if t == SLIDING else "global" for t in types),
        "rope_local_theta": float((local or {}).get("rope_theta", hf.value("rope_theta"))),
        # transformers reads YaRN's `truncate` beside the layer types' dicts, where it never is
        "rope_truncate": True,
    }


def gpt_oss(hf: HFConfig) -> dict:
    """gpt-oss: Llama's keys; without `rope_parameters`/`rope_scaling`, transformers' default YaRN
    (factor 32 over 4096 positions, `truncate` off)."""
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        hf = HFConfig({**hf, "rope_parameters": dict(GPT_OSS_ROPE)}, hf.defaults)
    return decoder(hf)


GPT_OSS_ROPE = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)


def gpt_oss_layers(hf: HFConfig) -> dict:
    """gpt-oss: without `layer_types`, sliding and full layers alternating from a sliding one."""
    n = hf["num_hidden_layers"]
    types = layer_types(hf, n, lambda hf, n: every(2, n))
    return {"sliding_windows": sliding_windows(hf, n, types), "layer_rope": ("global",) * n}


def gpt2_layers(hf: HFConfig) -> dict:
    """GPT-2: learned positions, no window."""
    return {"sliding_windows": (0,) * hf["n_layer"]}


# --- keys of some families ----------------------------------------------------------------------------------


def soft_caps(hf: HFConfig) -> dict:
    """Gemma 2/3: attention-logit and final-logit soft-capping, the `query_pre_attn_scalar` score scale."""
    if hf.get("use_bidirectional_attention"):
        raise UserError("config.json: use_bidirectional_attention is not supported (causal LM only)")
    return {
        "attn_logit_softcap": float(hf.value("attn_logit_softcapping") or 0.0),
        "final_logit_softcap": float(hf.value("final_logit_softcapping") or 0.0),
        "attn_scale": float(hf.value("query_pre_attn_scalar") or 256) ** -0.5,
    }


def qkv_bias(hf: HFConfig) -> dict:
    """Qwen2-MoE's own `qkv_bias` key (default true)."""
    return {"qkv_bias": bool(hf.value("qkv_bias"))}


def mixtral_experts(hf: HFConfig) -> dict:
    """Mixtral's experts: `intermediate_size` wide, top-k weights always renormalized."""
    experts = _experts(hf, dense_ok=True)
    return {**experts, "norm_topk_prob": True, "moe_intermediate_size": int(hf["intermediate_size"])}


def qwen_experts(hf: HFConfig) -> dict:
    """Qwen3-MoE's and Qwen2-MoE's experts: `moe_intermediate_size` wide, renormalized with
    `norm_topk_prob`; every layer must be a mixture of experts."""
    experts = _experts(hf, dense_ok=False)
    width = int(hf["moe_intermediate_size"])
    return {**experts, "norm_topk_prob": bool(hf.value("norm_topk_prob")), "moe_intermediate_size": width}


def shared_expert(hf: HFConfig) -> dict:
    """Qwen2-MoE's and Qwen3.5-MoE's shared expert: its width."""
    shared = hf.value("shared_expert_intermediate_size")
    if not isinstance(shared, int) or shared < 1:
        raise UserError(
            f"config.json: {hf.model_type} needs shared_expert_intermediate_size >= 1, got {shared!r}"
        )
    return {"shared_expert_intermediate_size": shared}


def gpt_oss_experts(hf: HFConfig) -> dict:
    """gpt-oss: experts `intermediate_size` wide; top-k of the router logits, softmax over those k (the
    renormalized top-k of the full softmax); the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`)."""
    experts = _experts(hf, dense_ok=True)
    return {
        **experts,
        "norm_topk_prob": True,
        "moe_intermediate_size": int(hf["intermediate_size"]),
        "swiglu_alpha": float(hf.value("swiglu_alpha")),
        "swiglu_limit": float(hf.value("swiglu_limit")),
        "attn_sinks": True,
    }


def _experts(hf: HFConfig, dense_ok: bool) -> dict:
    """The expert count (`num_local_experts` in transformers 5 and Mixtral, else `num_experts`), top-k and
    aux-loss weight; refused: dense layers among the MoE ones (unless `dense_ok`: Mixtral has no such
    keys), router jitter."""
    experts = hf.get("num_local_experts") or hf.value("num_experts")
    if not experts or experts < 2:
        raise UserError(f"config.json: {hf.model_type} needs at least 2 experts, got {experts!r}")
    top_k = int(hf.value("num_experts_per_tok"))
    if not 1 <= top_k <= experts:
        raise UserError(f"config.json: num_experts_per_tok {top_k} must be between 1 and {experts}")
    if not dense_ok and (hf.get("mlp_only_layers") or hf.value("decoder_sparse_step") != 1):
        raise UserError(
            f"config.json: {hf.model_type} with dense layers (mlp_only_layers, decoder_sparse_step != 1) is "
            "not supported; every layer must be a mixture of experts"
        )
    if hf.get("router_jitter_noise"):
        raise UserError("config.json: router_jitter_noise is not supported; set it to 0")
    return {
        "num_experts": int(experts),
        "experts_per_token": top_k,
        "router_aux_loss_coef": float(hf.value("router_aux_loss_coef")),
    }
