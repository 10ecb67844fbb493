"""The family registry: one `Family` per `model_type`, everything jaxlora knows about it in one entry.

An entry holds its weight table (`models.weights`: names, layouts, shapes, LoRA targets with their random
streams, the weights kept in float), the defaults of its transformers config class, the readers that turn
its `config.json` into `DecoderConfig` fields (`models.switches`) and the switches fixed for it, the
checkpoint buffers to skip, and the transformers 4 names PEFT still accepts for its MoE weights. The
config reader (`models.config.config_from_hf`), the spec (`models.spec`), the LoRA targets
(`models.targets`), the decoder's dropout streams and the loader's quantization all read it from here.
"""

import dataclasses
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from jaxlora.errors import UserError
from jaxlora.models import gemma4_spec as g4
from jaxlora.models import hybrid_weights as hw
from jaxlora.models import switches as sw
from jaxlora.models import weights as w
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.family_defaults import HFConfig

Reader = Callable[[HFConfig], dict]


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One `model_type`: its weights, its defaults and how its `config.json` is read."""

    weights: tuple[w.Entry, ...]  # in checkpoint order
    # Where the family's transformers config class defaults a key differently from `GENERIC`
    # (`tests/test_family_defaults.py` checks both against transformers).
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # DecoderConfig fields fixed for the family (norm placement, fused modules, q/k norms...).
    switches: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    read: Reader = sw.decoder  # the sizes and the switches every family has
    activation: Reader = sw.activation
    layers: Reader = sw.uniform_layers  # per layer: sliding windows, RoPE or not
    reads: tuple[Reader, ...] = ()  # keys of this family only (experts, soft-caps...)
    buffers: tuple[str, ...] = ()  # regexes of non-weight tensors its checkpoints may carry (skipped)
    # transformers 4 module names of its MoE weights, which PEFT still accepts in `target_modules` and
    # converts to `target_parameters` (two of them fused into gate_up_proj, whose adapter then has twice
    # the rank).
    moe_v4_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Multimodal model_types whose checkpoints hold this family as their text tower (`text_config`), and
    # the keys such a `text_config` leaves out that are read without a default (as transformers fills them).
    multimodal: tuple[str, ...] = ()
    text_config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def fields(self, hf: dict) -> dict:
        """The DecoderConfig fields this family reads from `hf` (config.json), defaults applied; the
        later readers' fields win, the fixed switches last."""
        hf = HFConfig(hf, self.defaults)
        out = {**self.read(hf), **self.activation(hf), **self.layers(hf)}
        for read in self.reads:
            out.update(read(hf))
        return {**out, **self.switches}

    @cached_property
    def dropout_streams(self) -> dict[tuple[str, str], int]:
        """(group, module) -> the stream of its LoRA dropout masks, for every linear LoRA can target."""
        return {e.path[1:3]: e.stream for e in self.weights if e.lora}


_EXPERTS_V4 = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_GEMMA = dict(norm_offset=1.0, embed_scale=True)  # RMSNorm times (1 + w); embeddings times sqrt(D)
_GEMMA2 = dict(_GEMMA, post_norm=True)
_OLMO2 = dict(pre_norm=False, post_norm=True, qk_norm_full=True)  # post-norms only, q/k norms over N*H

# transformers' Qwen3.5 config defaults that the dense and the MoE text configs share
_QWEN3_5 = dict(
    head_dim=256,
    max_position_embeddings=32768,
    partial_rotary_factor=0.25,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
)
# model_type -> family; the order is that of the "supported" list in error messages.
FAMILIES: dict[str, Family] = {
    "llama": Family(w.LLAMA, buffers=(w.ROTARY,)),
    "mistral": Family(
        w.LLAMA,
        dict(num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096),
        buffers=(w.ROTARY,),
    ),
    "qwen2": Family(  # q/k/v biases, never an o_proj bias
        w.LLAMA,
        dict(num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
        switches=dict(qkv_bias=True, o_bias=False),
        layers=sw.qwen_layers,
        buffers=(w.ROTARY,),
    ),
    "qwen3": Family(
        w.LLAMA,
        dict(head_dim=128, num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096),
        switches=dict(qk_norm=True),
        layers=sw.qwen_layers,
        buffers=(w.ROTARY,),
    ),
    "gpt2": Family(
        w.GPT2,
        dict(tie_word_embeddings=True),
        switches=dict(
            norm="layer", qkv_bias=True, o_bias=True, mlp_bias=True, learned_positions=True, fused_qkv=True
        ),
        read=sw.gpt2,
        activation=sw.gpt2_activation,
        layers=sw.gpt2_layers,
        buffers=(w.GPT2_MASKS,),
    ),
    "gemma": Family(
        w.LLAMA,
        dict(
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            head_dim=256,
            num_key_value_heads=16,
            max_position_embeddings=8192,
        ),
        switches=_GEMMA,
        activation=sw.gemma_activation,
        buffers=(w.ROTARY,),
    ),
    "gemma2": Family(
        w.GEMMA2,
        dict(
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            head_dim=256,
            num_key_value_heads=4,
            max_position_embeddings=8192,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        switches=_GEMMA2,
        activation=sw.gemma2_activation,
        layers=sw.gemma2_layers,
        reads=(sw.soft_caps,),
    ),
    "gemma3_text": Family(
        w.GEMMA2,
        dict(
            rope_theta=1_000_000.0,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            head_dim=256,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            sliding_window=4096,
        ),
        switches=dict(_GEMMA2, qk_norm=True),
        activation=sw.gemma2_activation,
        layers=sw.gemma3_layers,
        reads=(sw.soft_caps,),
        multimodal=("gemma3",),
        # transformers' Gemma3TextConfig (gemma-3-4b-it's text_config lists only a few keys)
        text_config_defaults=dict(
            vocab_size=262208, num_attention_heads=8, bos_token_id=2, eos_token_id=1, pad_token_id=0
        ),
    ),
    "phi3": Family(
        w.PHI3,
        dict(rms_norm_eps=1e-5, max_position_embeddings=4096, original_max_position_embeddings=4096),
        switches=dict(fused_qkv=True, fused_gate_up=True),
        buffers=(w.ROTARY,),
    ),
    "olmo2": Family(  # norms on the outputs only; q/k norms over the whole projection
        w.OLMO2,
        dict(rms_norm_eps=1e-5),
        switches=_OLMO2,
        buffers=(w.ROTARY,),
    ),
    "olmo3": Family(  # OLMo 2 with sliding layers (every 4th full) and their own RoPE
        w.OLMO2,
        dict(rope_theta=500_000.0, rms_norm_eps=1e-5, sliding_window=4096),
        switches=_OLMO2,
        layers=sw.olmo3_layers,
        buffers=(w.ROTARY,),
    ),
    "smollm3": Family(
        w.LLAMA,
        dict(
            rope_theta=2_000_000.0,
            tie_word_embeddings=True,
            num_key_value_heads=4,
            max_position_embeddings=32768,
        ),
        layers=sw.smollm3_layers,
        buffers=(w.ROTARY,),
    ),
    "mixtral": Family(
        w.MIXTRAL,
        dict(
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-5,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            num_experts=8,
        ),
        reads=(sw.mixtral_experts,),
        buffers=(w.ROTARY,),
        moe_v4_names={"gate": "router", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    ),
    "qwen3_moe": Family(
        w.QWEN3_MOE,
        dict(
            num_key_value_heads=4,
            max_position_embeddings=32768,
            sliding_window=4096,
            num_experts=128,
            num_experts_per_tok=8,
        ),
        switches=dict(qk_norm=True),
        layers=sw.gated_layers,
        reads=(sw.qwen_experts,),
        buffers=(w.ROTARY,),
        moe_v4_names={"gate": "router", **_EXPERTS_V4},
    ),
    # No moe_v4_names: PEFT 0.21 converts none for Qwen2-MoE (`gate_proj` etc. then name only the shared
    # expert's linears, and `all-linear` leaves experts and router alone), so jaxlora does the same.
    "qwen2_moe": Family(
        w.QWEN2_MOE,
        dict(
            num_key_value_heads=16,
            max_position_embeddings=32768,
            sliding_window=4096,
            num_experts=60,
            num_experts_per_tok=4,
            shared_expert_intermediate_size=5632,
        ),
        layers=sw.qwen2_moe_layers,
        reads=(sw.qkv_bias, sw.qwen_experts, sw.shared_expert),
        buffers=(w.ROTARY,),
    ),
    "gpt_oss": Family(  # sinks, alternating sliding/full layers, YaRN, biased experts with a clamped SwiGLU
        w.GPT_OSS,
        dict(
            rope_theta=150_000.0,
            head_dim=64,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,  # its default YaRN's (`switches.GPT_OSS_ROPE`)
            rms_norm_eps=1e-5,
            attention_bias=True,
            sliding_window=128,
            num_experts=128,
            num_experts_per_tok=4,
            swiglu_alpha=1.702,
            swiglu_limit=7.0,
        ),
        read=sw.gpt_oss,
        layers=sw.gpt_oss_layers,
        reads=(sw.gpt_oss_experts,),
        buffers=(w.ROTARY,),
    ),
    "qwen3_5_text": Family(  # hybrid: Gated DeltaNet and gated attention layers (`models.hybrid_weights`)
        hw.QWEN3_5,
        dict(_QWEN3_5, num_key_value_heads=4),
        switches=dict(_GEMMA, embed_scale=False, qk_norm=True, attn_output_gate=True),
        layers=sw.hybrid_layers,
        buffers=(w.ROTARY, hw.MTP),
        multimodal=("qwen3_5",),
    ),
    "qwen3_5_moe_text": Family(  # Qwen3.5's hybrid layers with Qwen2-MoE's experts and shared expert
        hw.QWEN3_5_MOE,
        dict(
            _QWEN3_5,
            num_key_value_heads=2,
            num_experts=256,
            num_experts_per_tok=8,
            shared_expert_intermediate_size=512,
        ),
        # the top-k weights always renormalized (its config has no norm_topk_prob)
        switches=dict(_GEMMA, embed_scale=False, qk_norm=True, attn_output_gate=True, norm_topk_prob=True),
        read=sw.sparse_decoder,
        layers=sw.hybrid_layers,
        reads=(sw.qwen_experts, sw.shared_expert),
        buffers=(w.ROTARY, hw.MTP),
        multimodal=("qwen3_5_moe",),
    ),
}
FAMILIES["gemma4_text"] = Family(  # PLE, KV sharing, two layer shapes (`models.gemma4_spec`)
    g4.GEMMA4,
    g4.DEFAULTS,
    switches=dict(embed_scale=True, post_norm=True),
    read=g4.gemma4_decoder,
    activation=sw.gemma2_activation,
    layers=g4.gemma4,
    multimodal=("gemma4",),
    # transformers' Gemma4TextConfig, for a `text_config` that leaves them out
    text_config_defaults=dict(
        vocab_size=262144, num_attention_heads=8, bos_token_id=2, eos_token_id=1, pad_token_id=0
    ),
)
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Multimodal model_type -> the model_type of its text tower (`text_config`).
TEXT_TOWERS = {mm: mt for mt, fam in FAMILIES.items() for mm in fam.multimodal}


def family(cfg: DecoderConfig) -> Family:
    if cfg.model_type not in FAMILIES:
        raise UserError(f"no model spec for model_type {cfg.model_type!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[cfg.model_type]


def hf_value(hf: dict, key: str):
    """`hf[key]` where `config.json` has the key (null included), else its family's transformers default."""
    fam = FAMILIES.get(hf.get("model_type"))
    return HFConfig(hf, fam.defaults if fam else None).value(key)
