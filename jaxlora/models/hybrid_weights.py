"""Hybrid layer patterns (Qwen3.5): which layers hold each weight, and the weight tables of Qwen3.5 and
Qwen3.5-MoE.

Qwen3.5's layers are `linear_attention` (Gated DeltaNet, `jaxlora.models.deltanet`) or `full_attention`
(attention with an output gate), per `DecoderConfig.mixers`. The weights every layer has (the two norms,
the MLP) are stacked on [L] as in every family; a token mixer's weights exist on the layers of its kind only
(`Entry.kind`) and are stacked on [L_kind], in layer order, under their own group:

    params["layers"]["linear_attn"]: {"in_proj_qkv" | "in_proj_z" | "in_proj_b" | "in_proj_a" | "out_proj":
        {"kernel": [L_lin, in, out]}, "conv1d": {"kernel": [L_lin, W, C]}, "A_log", "dt_bias": [L_lin, Hv],
        "norm": {"scale": [L_lin, Dv]}}
    params["layers"]["attn"]: {"q_proj": {"kernel": [L_full, D, 2 * N * H]} ([query; gate] per head),
        "k_proj" | "v_proj" | "o_proj": {"kernel": [L_full, in, out]},
        "q_norm" | "k_norm": {"scale": [L_full, H]}}

`layer_ids` maps a stack's rows to HF layer indices: the loader, the savers, random init and the PEFT
adapters read and write HF layer i at its row among its kind.
"""

import dataclasses
from operator import attrgetter

from jaxlora.models import weights as w
from jaxlora.models.decoder_config import DecoderConfig

LINEAR_ATTN, FULL_ATTN = "linear_attention", "full_attention"
# Tensors a Qwen3.5 checkpoint carries that are no part of the decoder: the multi-token-prediction head.
MTP = r"mtp\..*"


def layer_ids(entry: w.Entry, cfg: DecoderConfig) -> tuple[int, ...]:
    """The HF layers whose tensors form the rows of this per-layer entry's stack, in order."""
    if not entry.kind:
        return tuple(range(cfg.num_layers))
    # a layer's kind may join several weight kinds with "+" (Gemma 4: `models.gemma4_spec`)
    return tuple(i for i, kind in enumerate(cfg.mixers) if entry.kind in kind.split("+"))


def stack_rows(entry: w.Entry, cfg: DecoderConfig) -> int:
    """The leading size of a per-layer entry's stack: L, or L_kind for a mixer weight of a hybrid model."""
    return len(layer_ids(entry, cfg))


def _kind(kind: str, entries) -> tuple[w.Entry, ...]:
    return tuple(dataclasses.replace(e, kind=kind, when=None) for e in entries)


def CONV(cfg: DecoderConfig) -> int:
    """C: the conv's channels, [q; k; v]."""
    (hk, hv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
    return 2 * hk * dk + hv * dv


def HV(cfg: DecoderConfig) -> int:
    return cfg.linear_heads[1]


def VD(cfg: DecoderConfig) -> int:
    """Hv * Dv: the values' width."""
    return cfg.linear_heads[1] * cfg.linear_head_dims[1]


def DV(cfg: DecoderConfig) -> int:
    return cfg.linear_head_dims[1]


def Q2(cfg: DecoderConfig) -> int:
    return 2 * cfg.q_dim


W = attrgetter("linear_conv_kernel")
_LA = w.LAYER + "linear_attn."
_LINEAR_ATTN = _kind(
    LINEAR_ATTN,
    (
        w._target(11, _LA + "in_proj_qkv.weight", "linear_attn.in_proj_qkv.kernel", w.LINEAR,
                  (w.D, "embed"), (CONV, "linear_conv")),
        w._target(12, _LA + "in_proj_z.weight", "linear_attn.in_proj_z.kernel", w.LINEAR,
                  (w.D, "embed"), (VD, "linear_v")),
        w._target(13, _LA + "in_proj_b.weight", "linear_attn.in_proj_b.kernel", w.LINEAR,
                  (w.D, "embed"), (HV, "linear_heads")),
        w._target(14, _LA + "in_proj_a.weight", "linear_attn.in_proj_a.kernel", w.LINEAR,
                  (w.D, "embed"), (HV, "linear_heads")),
        w._entry(_LA + "conv1d.weight", "linear_attn.conv1d.kernel", w.DEPTHWISE,
                 (W, None), (CONV, "linear_conv")),
        w._entry(_LA + "dt_bias", "linear_attn.dt_bias", w.VECTOR, (HV, "linear_heads")),
        w._entry(_LA + "A_log", "linear_attn.A_log", w.VECTOR, (HV, "linear_heads")),
        w._entry(_LA + "norm.weight", "linear_attn.norm.scale", w.VECTOR, (DV, None)),
        w._target(15, _LA + "out_proj.weight", "linear_attn.out_proj.kernel", w.LINEAR,
                  (VD, "linear_v"), (w.D, "embed")),
    ),
)  # fmt: skip
_GATED_ATTN = _kind(
    FULL_ATTN,
    (
        w._target(0, w._A + "q_proj.weight", "attn.q_proj.kernel", w.LINEAR, (w.D, "embed"), (Q2, "q_heads")),
        w._QKVO[2],  # k_proj
        w._QKVO[4],  # v_proj
        w._QKVO[6],  # o_proj
        *w._HEAD_QK_NORM,
    ),
)
QWEN3_5 = (w._EMBED, w._FINAL, *w._PRE_NORMS, *_LINEAR_ATTN, *_GATED_ATTN, *w._GATE_UP_DOWN, w._HEAD)
# Qwen3.5-MoE: the same layers with Qwen2-MoE's MLP in every layer (routed experts and a gated shared expert).
QWEN3_5_MOE = (
    w._EMBED,
    w._FINAL,
    *w._PRE_NORMS,
    *_LINEAR_ATTN,
    *_GATED_ATTN,
    *w._moe("mlp", "gate_proj", "up_proj", "down_proj"),
    *w._SHARED,
    w._HEAD,
)
