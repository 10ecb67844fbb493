"""Gemma 4's text decoder declared (`gemma4_text`): its layer kinds, its `config.json` reader, its weights.

Gemma 4's layers differ in shape by type: a `full_attention` layer has its own head dim (`global_head_dim`,
in transformers 5's `per_layer_config`) and, with `attention_k_eq_v`, its own kv heads and no v_proj (the
keys serve as values). The last `num_kv_shared_layers` layers have no k/v projections: each attends with
the keys and values of the last earlier layer of its type. So each layer gets a kind (`DecoderConfig.mixers`)
naming the weight kinds it holds, joined by "+" (`models.hybrid_weights.layer_ids`):

    sliding_attention+sliding_kv   q/o/q_norm of a sliding layer and its own k/v/k_norm
    sliding_attention              a KV-shared sliding layer: q/o/q_norm only
    full_attention+full_kv, full_attention   the same for the full layers

and each weight kind is stacked on its own leading axis (`Entry.kind`), in layer order:

    params["layers"]["attn"]:        q_proj [L_sl, D, N*H], o_proj [L_sl, N*H, D], q_norm [L_sl, H],
                                     k_proj | v_proj [L_slkv, D, K*H], k_norm [L_slkv, H]
    params["layers"]["global_attn"]: the same with Hg, Kg (`global_head_dim`, `global_kv_heads`)
    params["layers"]["ple"]:         per_layer_input_gate [L, D, P], per_layer_projection [L, P, D],
                                     post_norm [L, D];  ["layer_scalar"]: {"scale": [L, 1]}
    params["ple"]: {"embedding": [Vp, L*P], "projection": {"kernel": [D, L*P]}, "norm": {"scale": [P]}}

Per-layer input embeddings (PLE, P = `hidden_size_per_layer_input`) and the rest of the computation are in
`jaxlora.models.gemma4_layers`.
"""

import dataclasses
from operator import attrgetter

from jaxlora.errors import UserError
from jaxlora.models import switches as sw
from jaxlora.models import weights as w
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.family_defaults import HFConfig
from jaxlora.models.layer_settings import FULL, SLIDING, layer_types, rope_parameters, sliding_windows

SLIDING_KV, FULL_KV = "sliding_kv", "full_kv"
# With `use_double_wide_mlp` the KV-shared layers' MLP is twice as wide: MLP weights of two kinds.
MLP, WIDE_MLP = "mlp", "wide_mlp"
# Where transformers' Gemma4TextConfig defaults a key differently from `GENERIC` (its own keys included).
DEFAULTS = dict(
    head_dim=256,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
    sliding_window=512,
    vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=256,
    attention_k_eq_v=False,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
)
GLOBAL_HEAD_DIM = 512  # transformers' default for the `global_head_dim` key (read, not kept, by its config)


def layer_kinds(types: list[str], shared: int, wide: bool = False) -> tuple[str, ...]:
    """Each layer's kind: its type, "+" its k/v weights' kind unless it is one of the last `shared`; with
    `wide` (double-wide MLPs on the shared layers), "+" its MLP's kind too."""
    first = len(types) - shared
    kv = {SLIDING: SLIDING_KV, FULL: FULL_KV}
    out = []
    for i, t in enumerate(types):
        parts = [t] + ([kv[t]] if i < first else [])
        out.append("+".join(parts + ([MLP if i < first else WIDE_MLP] if wide else [])))
    return tuple(out)


def layer_type(kind: str) -> str:
    return kind.split("+")[0]


def own_kv(kind: str) -> bool:
    """Whether a layer of this kind has its own k/v weights (is not KV-shared)."""
    return bool({SLIDING_KV, FULL_KV} & set(kind.split("+")))


def kv_source(cfg: DecoderConfig) -> tuple[int, ...]:
    """Per layer: the layer whose keys and values it attends with (itself unless KV-shared: the last layer of
    its type before the shared ones, as transformers' `kv_sharing_modes`)."""
    out = []
    for i, kind in enumerate(cfg.mixers):
        own = [j for j, k in enumerate(cfg.mixers) if own_kv(k) and layer_type(k) == layer_type(kind)]
        out.append(i if own_kv(kind) else own[-1])
    return tuple(out)


def wide_mlp(cfg: DecoderConfig) -> bool:
    return any(WIDE_MLP in k.split("+") for k in cfg.mixers)


def gemma4_decoder(hf: HFConfig) -> dict:
    """Llama's keys (`switches.decoder`), RoPE aside: `gemma4` reads it per layer type."""
    return sw.decoder(HFConfig({**hf, "rope_parameters": None}, hf.defaults))


def gemma4(hf: HFConfig) -> dict:
    """Gemma 4's keys past Gemma's: the layer kinds and windows, the full layers' head dim and kv heads,
    `attention_k_eq_v`, the KV-shared layers, PLE, the RoPE of each layer type, final soft-capping."""
    n = hf["num_hidden_layers"]
    # "vision": image tokens see each other both ways; jaxlora feeds text only, which stays causal
    if hf.get("use_bidirectional_attention") not in (None, "vision"):
        raise UserError("config.json: use_bidirectional_attention 'all' is not supported (causal LM only)")
    types = layer_types(hf, n, lambda hf, n: [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    types[-1] = FULL  # as transformers forces it
    shared = int(hf.value("num_kv_shared_layers") or 0)
    if not 0 <= shared < n or (shared and {*types[: n - shared]} != {*types}):
        raise UserError(f"config.json: num_kv_shared_layers {shared} leaves a layer type without its own k/v")
    heads, kv_heads = _global_heads(hf, types)
    return {
        "mixers": layer_kinds(types, shared, bool(shared and hf.value("use_double_wide_mlp"))),
        "sliding_windows": sliding_windows(hf, n, types),
        "layer_rope": tuple("local" if t == SLIDING else "global" for t in types),
        "global_head_dim": heads,
        "global_kv_heads": kv_heads,
        "k_eq_v": bool(hf.value("attention_k_eq_v")),
        "ple_dim": int(hf.value("hidden_size_per_layer_input") or 0),
        "ple_vocab": int(hf.value("vocab_size_per_layer_input")),
        "final_logit_softcap": float(hf.value("final_logit_softcapping") or 0.0),
        "attn_scale": 1.0,  # the scores are q . k, unscaled (the q/k norms keep them small)
        **_rope(hf, heads),
        **(_experts(hf) if hf.get("enable_moe_block") else {}),
    }


def _experts(hf: HFConfig) -> dict:
    """The MoE block's experts: `num_experts`, `top_k_experts` (top-k always renormalized), their width;
    transformers adds no load-balancing loss for Gemma 4."""
    e, k, f = hf.get("num_experts"), hf.get("top_k_experts"), hf.get("moe_intermediate_size")
    if not (e and e >= 2 and k and 1 <= k <= e and f):
        raise UserError(
            "config.json: gemma4_text's enable_moe_block needs num_experts >= 2, top_k_experts between 1 "
            "and num_experts, and moe_intermediate_size"
        )
    return dict(
        num_experts=int(e),
        experts_per_token=int(k),
        norm_topk_prob=True,
        moe_intermediate_size=int(f),
        router_aux_loss_coef=0.0,
    )


def _global_heads(hf: HFConfig, types: list[str]) -> tuple[int, int]:
    """(head dim, kv heads) of the full layers: transformers 5's `per_layer_config`, else the 4.x-style
    `global_head_dim` and `num_global_key_value_heads` (the latter only with `attention_k_eq_v`)."""
    per = {int(i): over for i, over in (hf.get("per_layer_config") or {}).items()}  # keys "05" or 5
    full = [i for i, t in enumerate(types) if t == FULL]
    over = [per.get(i) or {} for i in full]
    if set(per) - set(full):
        raise UserError("config.json: per_layer_config on a sliding layer is not supported")
    if per:
        if any(o != over[0] for o in over):
            raise UserError("config.json: per_layer_config must set the same values on every full layer")
        extra = set(over[0]) - {"head_dim", "num_key_value_heads"}
        if extra:
            raise UserError(f"config.json: per_layer_config key {sorted(extra)[0]!r} is not supported")
        got = over[0]
    else:
        got = {"head_dim": hf.get("global_head_dim") or GLOBAL_HEAD_DIM}
        if hf.value("attention_k_eq_v") and hf.get("num_global_key_value_heads"):
            got["num_key_value_heads"] = hf["num_global_key_value_heads"]
    return int(got.get("head_dim") or hf.value("head_dim")), int(
        got.get("num_key_value_heads") or hf.value("num_key_value_heads")
    )


def _rope(hf: HFConfig, global_head: int) -> dict:
    """Per layer type: default RoPE on the sliding layers; default or proportional (a `partial_rotary_factor`
    of the rotations over the whole head, the rest at angle 0) on the full ones."""
    full, sliding = rope_parameters(hf)
    full = full or {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}
    sliding = sliding or {"rope_type": "default", "rope_theta": 10_000.0}
    if (sliding.get("rope_type") or "default") != "default":
        raise UserError("config.json: only default RoPE is supported for Gemma 4's sliding layers")
    kind = full.get("rope_type") or "default"
    if kind not in ("default", "proportional"):
        raise UserError(f"config.json: rope_type {kind!r} on Gemma 4's full layers is not supported")
    fraction = float(full.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
    return {
        "rope_theta": float(full["rope_theta"]),
        "rope_type": "proportional" if kind == "proportional" else "default",
        "rope_factor": float(full.get("factor", 1.0)),
        "rotary_dim": 2 * int(fraction * global_head // 2),  # the rotated dims of a full layer's head
        "rope_local_theta": float(sliding["rope_theta"]),
    }


# --- weights ------------------------------------------------------------------------------------------------


def HG(cfg: DecoderConfig) -> int:
    return cfg.global_head_dim


def QG(cfg: DecoderConfig) -> int:
    return cfg.num_heads * cfg.global_head_dim


def KVG(cfg: DecoderConfig) -> int:
    return cfg.global_kv_heads * cfg.global_head_dim


def PLE(cfg: DecoderConfig) -> int:
    return cfg.ple_dim


def PLE_ALL(cfg: DecoderConfig) -> int:
    """L * P: the packed per-layer embedding width."""
    return cfg.num_layers * cfg.ple_dim


def _has_ple(cfg: DecoderConfig) -> bool:
    return cfg.ple_dim > 0


def _separate_v(cfg: DecoderConfig) -> bool:
    return not cfg.k_eq_v


H, Q, KV, D, VP = w.H, w.Q, w.KV, w.D, attrgetter("ple_vocab")
_A, _L = w._A, w.LAYER


def _attention(group: str, kind: str, kv_kind: str, q, kv, h, streams, v_when=None) -> tuple[w.Entry, ...]:
    """One layer type's attention weights: q/o/q_norm on every layer of `kind`, k/v/k_norm on those of
    `kv_kind` (v_proj only where `v_when` holds)."""
    sq, sk, sv, so = streams
    rows = (
        (
            kind,
            w._target(
                sq, _A + "q_proj.weight", f"{group}.q_proj.kernel", w.LINEAR, (D, "embed"), (q, "q_heads")
            ),
        ),
        (kind, w._entry(_A + "q_norm.weight", f"{group}.q_norm.scale", w.VECTOR, (h, None))),
        (
            kv_kind,
            w._target(
                sk, _A + "k_proj.weight", f"{group}.k_proj.kernel", w.LINEAR, (D, "embed"), (kv, "kv_heads")
            ),
        ),
        (
            kv_kind,
            w._target(
                sv,
                _A + "v_proj.weight",
                f"{group}.v_proj.kernel",
                w.LINEAR,
                (D, "embed"),
                (kv, "kv_heads"),
                when=v_when,
            ),
        ),
        (kv_kind, w._entry(_A + "k_norm.weight", f"{group}.k_norm.scale", w.VECTOR, (h, None))),
        (
            kind,
            w._target(
                so, _A + "o_proj.weight", f"{group}.o_proj.kernel", w.LINEAR, (q, "q_heads"), (D, "embed")
            ),
        ),
    )
    return tuple(_kinded(e, k) for k, e in rows)


def _kinded(entry: w.Entry, kind: str) -> w.Entry:
    return dataclasses.replace(entry, kind=kind)


_PLE_TOP = (
    w._entry(
        "model.embed_tokens_per_layer.weight",
        "ple.embedding",
        w.EMBEDDING,
        (VP, "vocab"),
        (PLE_ALL, None),
        when=_has_ple,
    ),
    w._entry(
        "model.per_layer_model_projection.weight",
        "ple.projection.kernel",
        w.LINEAR,
        (D, "embed"),
        (PLE_ALL, None),
        when=_has_ple,
    ),
    w._entry(
        "model.per_layer_projection_norm.weight", "ple.norm.scale", w.VECTOR, (PLE, None), when=_has_ple
    ),
)
_PLE_LAYER = (
    w._target(
        16,
        _L + "per_layer_input_gate.weight",
        "ple.per_layer_input_gate.kernel",
        w.LINEAR,
        (D, "embed"),
        (PLE, None),
        when=_has_ple,
    ),
    w._target(
        17,
        _L + "per_layer_projection.weight",
        "ple.per_layer_projection.kernel",
        w.LINEAR,
        (PLE, None),
        (D, "embed"),
        when=_has_ple,
    ),
    w._entry(
        _L + "post_per_layer_input_norm.weight", "ple.post_norm.scale", w.VECTOR, (D, None), when=_has_ple
    ),
)


def _narrow(cfg: DecoderConfig) -> bool:
    return not wide_mlp(cfg)


def _wide(stream: int, name: str, fan_in, fan_out, kind: str) -> w.Entry:
    group = "mlp" if kind == MLP else "wide_mlp"
    entry = w._target(stream, _L + f"mlp.{name}.weight", f"{group}.{name}.kernel", w.LINEAR, fan_in, fan_out)
    return dataclasses.replace(entry, kind=kind, when=wide_mlp)


def I2(cfg: DecoderConfig) -> int:
    return 2 * cfg.intermediate_size


# With double-wide MLPs: the MLP of the layers with their own k/v (`mlp`, [L_kv]) and the wide one of the
# KV-shared layers (`wide_mlp`, [L_shared], width 2I; the layer reads it as its `mlp`).
_MLPS = tuple(
    _wide(stream, name, fan_in, fan_out, kind)
    for kind, width, streams in ((MLP, w.I, (4, 5, 6)), (WIDE_MLP, I2, (23, 24, 25)))
    for stream, name, fan_in, fan_out in zip(
        streams,
        ("gate_proj", "up_proj", "down_proj"),
        ((D, "embed"), (D, "embed"), (width, "mlp")),
        ((width, "mlp"), (width, "mlp"), (D, "embed")),
        strict=True,
    )
)


def _has_moe(cfg: DecoderConfig) -> bool:
    return cfg.num_experts > 0


# The MoE block beside the MLP: a router (its input RMS-normed without scale, times `router.scale` and
# D^-1/2; an nn.Linear `router.proj`, so a linear LoRA target as in PEFT's all-linear; each top-k weight
# times its expert's `per_expert_scale`) and experts stored fused as transformers 5 keeps them (GeGLU,
# gate first), adapted through `target_parameters`; its own pre-norm and two post-norms.
_MOE = (
    w._entry(_L + "router.scale", "moe.router_scale.scale", w.VECTOR, (D, None), when=_has_moe),
    w._target(22, _L + "router.proj.weight", "moe.router.kernel", w.LINEAR, (D, "embed"), (w.E, None),
              keep_float=True, when=_has_moe),
    w._entry(_L + "router.per_expert_scale", "moe.expert_scale.scale", w.VECTOR, (w.E, None), when=_has_moe),
    w._entry(_L + "experts.gate_up_proj", "moe.gate_up_proj.kernel", w.EXPERTS, (w.E, "expert"),
             (D, "embed"), (w.FE2, "mlp"), param=True, stream=1002, when=_has_moe),
    w._entry(_L + "experts.down_proj", "moe.down_proj.kernel", w.EXPERTS, (w.E, "expert"), (w.FE, "mlp"),
             (D, "embed"), param=True, stream=1003, when=_has_moe),
    w._entry(_L + "post_feedforward_layernorm_1.weight", "mlp_post_norm_1.scale", w.VECTOR, (D, None),
             when=_has_moe),
    w._entry(_L + "pre_feedforward_layernorm_2.weight", "moe_norm.scale", w.VECTOR, (D, None), when=_has_moe),
    w._entry(_L + "post_feedforward_layernorm_2.weight", "moe_post_norm.scale", w.VECTOR, (D, None),
             when=_has_moe),
)  # fmt: skip
GEMMA4 = (
    w._EMBED,
    w._FINAL,
    w._entry(_L + "layer_scalar", "layer_scalar.scale", w.VECTOR, (w.ONE, None)),
    *w._SANDWICH_NORMS,
    *_attention("attn", SLIDING, SLIDING_KV, Q, KV, H, (0, 1, 2, 3)),
    *_attention("global_attn", FULL, FULL_KV, QG, KVG, HG, (18, 19, 20, 21), v_when=_separate_v),
    *(dataclasses.replace(e, when=_narrow) for e in w._GATE_UP_DOWN[::2]),
    *_MLPS,
    *_MOE,
    *_PLE_LAYER,
    *_PLE_TOP,
    w._HEAD,
)
