"""One `Entry` per weight of a Hugging Face checkpoint, the rows families share, and each family's table.

An entry holds every fact about one weight: its HF name (`{i}` = layer index), its path in the params
tree, its layout, its shape as a function of the `DecoderConfig` with the logical sharding axis of each
dim, whether it exists for this config (biases, untied head), whether LoRA can target it (and the random
stream of its adapter), and whether it stays in float when the base is quantized. A family's table
(`LLAMA`, `GPT2`, ...) lists its weights in checkpoint order; `models.families` gives each `model_type`
its table, and `models.spec` derives the rest.

Layouts: LINEAR (torch `nn.Linear` [out, in], transposed on load), CONV1D (stored as jaxlora keeps it,
[in, out], never transposed: GPT-2's Conv1D and gpt-oss's stacked experts [E, in, out]), VECTOR (norms,
biases), EMBEDDING ([rows, D] on both sides). Fused HF tensors stay fused (GPT-2's `c_attn`, Phi-3's
`qkv_proj` and `gate_up_proj`): the decoder splits their outputs, and LoRA targets them under their own
names, as PEFT does.
"""

import dataclasses
from collections.abc import Callable
from operator import attrgetter

from jaxlora.models.decoder_config import DecoderConfig

LINEAR, CONV1D, VECTOR, EMBEDDING = "linear", "conv1d", "vector", "embedding"
DEPTHWISE = "depthwise"  # a depthwise conv's weight: HF [C, 1, W], jaxlora [W, C] (Gated DeltaNet's conv1d)
# Stacked experts: jaxlora [E, in, out]; HF's fused layout (transformers 5 in memory) [E, out, in] under
# `hf`, the hub's per-expert layout as torch Linears [out, in] under `parts` (concatenated along `out`).
EXPERTS = "experts"

Size = Callable[[DecoderConfig], int]
Cond = Callable[[DecoderConfig], bool]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One weight: HF name, params path, layout, dims and when it exists (see the module docstring)."""

    hf: str  # "model.layers.{i}.self_attn.q_proj.weight"
    path: tuple[str, ...]  # ("layers", "attn", "q_proj", "kernel")
    layout: str
    dims: tuple[tuple[Size, str | None], ...]  # one layer, jaxlora layout: (size, logical axis) per dim
    lora: bool = False  # a per-layer linear layer LoRA can target (`target_modules`)
    when: Cond | None = None  # None: always present
    alias: str | None = None  # another name of the same tensor (Mixtral's router: mlp.gate)
    parts: tuple[str, ...] = ()  # EXPERTS: per-expert HF names (`{j}` = expert), joined along `out`
    # A MoE weight LoRA adapts through PEFT's `target_parameters` (`models.targets.ParamTarget`), under
    # transformers 5's name: the alias where there is one (the router), else `hf`.
    param: bool = False
    # A LoRA target's random stream: a linear's dropout mask is drawn from fold_in(layer key, stream), a
    # parameter target's A from fold_in(init key, stream). Fixed numbers, so masks and draws do not
    # depend on which other modules are targeted.
    stream: int | None = None
    keep_float: bool = False  # never quantized (the MoE routers: see `quantized`)
    kind: str = ""  # on the layers of this kind only (a hybrid model: `models.hybrid_weights`); "": all

    def __post_init__(self):
        assert (self.lora or self.param) == (self.stream is not None), f"{self.hf}: streams are for targets"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer) if self.per_layer else self.hf

    def shape(self, cfg: DecoderConfig) -> tuple[int, ...]:
        """jaxlora's shape of one layer (a kernel is [in, out]); stacked weights add [L] in front."""
        return tuple(size(cfg) for size, _ in self.dims)

    @property
    def axes(self) -> tuple[str | None, ...]:
        """Logical names of the dims of the params leaf ("layers" first for a stacked weight)."""
        own = tuple(axis for _, axis in self.dims)
        return ("layers", *own) if self.per_layer else own

    def present(self, cfg: DecoderConfig) -> bool:
        return self.when is None or self.when(cfg)

    def get(self, params: dict):
        for key in self.path:
            params = params[key]
        return params

    def put(self, params: dict, value) -> None:
        for key in self.path[:-1]:
            params = params.setdefault(key, {})
        params[self.path[-1]] = value


def quantized(entry: Entry) -> bool:
    """Whether `quant.weights` stores this weight quantized: the kernels of linear layers and experts, but
    not a router's (a few quantization steps could flip which experts a token gets; its D x E values per
    layer are nothing to save)."""
    return entry.layout in (LINEAR, CONV1D, EXPERTS) and not entry.keep_float


def _entry(hf: str, path: str, layout: str, *dims, when: Cond | None = None, **extra) -> Entry:
    """An entry; `path` is dotted, under "layers" for a per-layer weight (`{i}` in its HF name)."""
    keys = tuple(path.split("."))
    return Entry(hf, ("layers", *keys) if "{i}" in hf else keys, layout, dims, when=when, **extra)


def _target(stream: int, hf: str, path: str, layout: str, *dims, **extra) -> Entry:
    """A linear layer LoRA can target, its dropout masks drawn from `stream`."""
    return _entry(hf, path, layout, *dims, lora=True, stream=stream, **extra)


# Sizes, as functions of the config.
V, D, I = attrgetter("vocab_size"), attrgetter("hidden_size"), attrgetter("intermediate_size")
Q, KV, H = attrgetter("q_dim"), attrgetter("kv_dim"), attrgetter("head_dim")
P = attrgetter("max_position_embeddings")
E, FE = attrgetter("num_experts"), attrgetter("moe_intermediate_size")
FS = attrgetter("shared_expert_intermediate_size")


def ONE(cfg: DecoderConfig) -> int:
    return 1


def FE2(cfg: DecoderConfig) -> int:
    return 2 * cfg.moe_intermediate_size


def QKV(cfg: DecoderConfig) -> int:
    return cfg.q_dim + 2 * cfg.kv_dim


def I2(cfg: DecoderConfig) -> int:
    return 2 * cfg.intermediate_size


def _untied(cfg: DecoderConfig) -> bool:
    return not cfg.tie_word_embeddings


_qkv_bias, _o_bias = attrgetter("qkv_bias"), attrgetter("o_bias")
_mlp_bias, _qk_norm = attrgetter("mlp_bias"), attrgetter("qk_norm")

# Each row: HF name, params path (under "layers" when per layer), layout, then (size, logical axis) for
# each dim in jaxlora's layout (a kernel is [in, out]); `lora` marks LoRA targets, `when` optional weights.
LAYER = "model.layers.{i}."  # the HF name prefix of layer i
_A, _M = LAYER + "self_attn.", LAYER + "mlp."
_EMBED = _entry("model.embed_tokens.weight", "embed.embedding", EMBEDDING, (V, "vocab"), (D, "embed"))
_FINAL = _entry("model.norm.weight", "final_norm.scale", VECTOR, (D, None))
_HEAD = _entry("lm_head.weight", "lm_head.kernel", LINEAR, (D, "embed"), (V, "vocab"), when=_untied)
# Norm placements: Llama's two pre-norms; Gemma 2/3's pre- and post-norms; OLMo 2's post-norms only.
_PRE_NORMS = (
    _entry(LAYER + "input_layernorm.weight", "attn_norm.scale", VECTOR, (D, None)),
    _entry(LAYER + "post_attention_layernorm.weight", "mlp_norm.scale", VECTOR, (D, None)),
)
_ATTN_POST = _entry(LAYER + "post_attention_layernorm.weight", "attn_post_norm.scale", VECTOR, (D, None))
_MLP_POST = _entry(LAYER + "post_feedforward_layernorm.weight", "mlp_post_norm.scale", VECTOR, (D, None))
_SANDWICH_NORMS = (
    _entry(LAYER + "input_layernorm.weight", "attn_norm.scale", VECTOR, (D, None)),
    _ATTN_POST,
    _entry(LAYER + "pre_feedforward_layernorm.weight", "mlp_norm.scale", VECTOR, (D, None)),
    _MLP_POST,
)
_QKVO = (
    _target(0, _A + "q_proj.weight", "attn.q_proj.kernel", LINEAR, (D, "embed"), (Q, "q_heads")),
    _entry(_A + "q_proj.bias", "attn.q_proj.bias", VECTOR, (Q, "q_heads"), when=_qkv_bias),
    _target(1, _A + "k_proj.weight", "attn.k_proj.kernel", LINEAR, (D, "embed"), (KV, "kv_heads")),
    _entry(_A + "k_proj.bias", "attn.k_proj.bias", VECTOR, (KV, "kv_heads"), when=_qkv_bias),
    _target(2, _A + "v_proj.weight", "attn.v_proj.kernel", LINEAR, (D, "embed"), (KV, "kv_heads")),
    _entry(_A + "v_proj.bias", "attn.v_proj.bias", VECTOR, (KV, "kv_heads"), when=_qkv_bias),
    _target(3, _A + "o_proj.weight", "attn.o_proj.kernel", LINEAR, (Q, "q_heads"), (D, "embed")),
    _entry(_A + "o_proj.bias", "attn.o_proj.bias", VECTOR, (D, "embed"), when=_o_bias),
)
_HEAD_QK_NORM = (  # per head [H] (Qwen3, Gemma 3)
    _entry(_A + "q_norm.weight", "attn.q_norm.scale", VECTOR, (H, None), when=_qk_norm),
    _entry(_A + "k_norm.weight", "attn.k_norm.scale", VECTOR, (H, None), when=_qk_norm),
)
_GATE_UP_DOWN = (
    _target(4, _M + "gate_proj.weight", "mlp.gate_proj.kernel", LINEAR, (D, "embed"), (I, "mlp")),
    _entry(_M + "gate_proj.bias", "mlp.gate_proj.bias", VECTOR, (I, "mlp"), when=_mlp_bias),
    _target(5, _M + "up_proj.weight", "mlp.up_proj.kernel", LINEAR, (D, "embed"), (I, "mlp")),
    _entry(_M + "up_proj.bias", "mlp.up_proj.bias", VECTOR, (I, "mlp"), when=_mlp_bias),
    _target(6, _M + "down_proj.weight", "mlp.down_proj.kernel", LINEAR, (I, "mlp"), (D, "embed")),
    _entry(_M + "down_proj.bias", "mlp.down_proj.bias", VECTOR, (D, "embed"), when=_mlp_bias),
)
# Checkpoint buffers the loader skips: rotary caches some checkpoints saved (regexes).
ROTARY = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
# Llama, Mistral, Qwen2/3, Gemma, SmolLM3: the same weights, different switches (models.families).
LLAMA = (_EMBED, _FINAL, *_PRE_NORMS, *_QKVO, *_HEAD_QK_NORM, *_GATE_UP_DOWN, _HEAD)
# Gemma 2 and Gemma 3: norms before and after attention and the MLP (q/k norms: Gemma 3).
GEMMA2 = (_EMBED, _FINAL, *_SANDWICH_NORMS, *_QKVO, *_HEAD_QK_NORM, *_GATE_UP_DOWN, _HEAD)
# OLMo 2: post-norms only; q/k norms over the whole projection.
OLMO2 = (
    _EMBED,
    _FINAL,
    _ATTN_POST,
    _MLP_POST,
    *_QKVO,
    _entry(_A + "q_norm.weight", "attn.q_norm.scale", VECTOR, (Q, None)),
    _entry(_A + "k_norm.weight", "attn.k_norm.scale", VECTOR, (KV, None)),
    *_GATE_UP_DOWN,
    _HEAD,
)
# Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows).
PHI3 = (
    _EMBED,
    _FINAL,
    *_PRE_NORMS,
    _target(0, _A + "qkv_proj.weight", "attn.qkv_proj.kernel", LINEAR, (D, "embed"), (QKV, "qkv")),
    _QKVO[6],
    _target(4, _M + "gate_up_proj.weight", "mlp.gate_up_proj.kernel", LINEAR, (D, "embed"), (I2, "mlp")),
    _GATE_UP_DOWN[4],
    _HEAD,
)


def _moe(hub_block: str, gate: str, up: str, down: str) -> tuple[Entry, ...]:
    """The router [D, E] and the stacked experts: gate_up [E, D, 2F] (gate first), down [E, F, D]; LoRA
    adapts all three as PEFT's `target_parameters` (in this order: transformers defines them so), and
    the router stays in float."""
    mlp, hub = LAYER + "mlp.", LAYER + hub_block + "."
    return (
        _entry(
            hub + "gate.weight",
            "moe.router.kernel",
            LINEAR,
            (D, "embed"),
            (E, None),
            alias=mlp + "gate.weight",
            param=True,
            stream=1001,
            keep_float=True,
        ),
        _entry(
            mlp + "experts.gate_up_proj",
            "moe.gate_up_proj.kernel",
            EXPERTS,
            (E, "expert"),
            (D, "embed"),
            (FE2, "mlp"),
            parts=(f"{hub}experts.{{j}}.{gate}.weight", f"{hub}experts.{{j}}.{up}.weight"),
            param=True,
            stream=1002,
        ),
        _entry(
            mlp + "experts.down_proj",
            "moe.down_proj.kernel",
            EXPERTS,
            (E, "expert"),
            (FE, "mlp"),
            (D, "embed"),
            parts=(f"{hub}experts.{{j}}.{down}.weight",),
            param=True,
            stream=1003,
        ),
    )


# Mixtral and Qwen3-MoE: Llama's attention (Qwen3's q/k norms) and a mixture of experts for the MLP.
MIXTRAL = (_EMBED, _FINAL, *_PRE_NORMS, *_QKVO, *_moe("block_sparse_moe", "w1", "w3", "w2"), _HEAD)
QWEN3_MOE = (
    _EMBED,
    _FINAL,
    *_PRE_NORMS,
    *_QKVO,
    *_HEAD_QK_NORM,
    *_moe("mlp", "gate_proj", "up_proj", "down_proj"),
    _HEAD,
)

# Qwen2-MoE: Qwen2's attention (q/k/v biases), the experts, and a shared SwiGLU expert whose output is
# scaled by sigmoid(shared_expert_gate(x)). The shared expert's linears are ordinary LoRA targets and are
# quantized like any linear; its gate [D, 1] (at shared_expert.router) stays in float like the router:
# D values per layer, nothing to save.
_SE, _SP = _M + "shared_expert.", "shared_expert."
_SHARED = (
    _target(7, _SE + "gate_proj.weight", _SP + "gate_proj.kernel", LINEAR, (D, "embed"), (FS, "mlp")),
    _target(8, _SE + "up_proj.weight", _SP + "up_proj.kernel", LINEAR, (D, "embed"), (FS, "mlp")),
    _target(9, _SE + "down_proj.weight", _SP + "down_proj.kernel", LINEAR, (FS, "mlp"), (D, "embed")),
    _target(
        10,
        _M + "shared_expert_gate.weight",
        _SP + "router.kernel",
        LINEAR,
        (D, "embed"),
        (ONE, None),
        keep_float=True,
    ),
)
QWEN2_MOE = (
    _EMBED,
    _FINAL,
    *_PRE_NORMS,
    *_QKVO,
    *_moe("mlp", "gate_proj", "up_proj", "down_proj"),
    *_SHARED,
    _HEAD,
)


def _sinks(cfg: DecoderConfig) -> bool:
    return cfg.attn_sinks


N = attrgetter("num_heads")
# gpt-oss: Llama's attention with biases and a sink logit per head; its own MoE block. The router
# (mlp.router, a Parameter pair, not an nn.Linear) has a bias; the experts are stored [E, in, out] (no
# transpose: CONV1D), gate and up columns interleaved, with a bias per expert. LoRA adapts router and
# experts as PEFT's `target_parameters` (transformers' names), as for Mixtral.
GPT_OSS = (
    _EMBED,
    _FINAL,
    *_PRE_NORMS,
    *_QKVO,
    _entry(_A + "sinks", "attn.sinks.logit", VECTOR, (N, None), when=_sinks),
    _entry(
        _M + "router.weight",
        "moe.router.kernel",
        LINEAR,
        (D, "embed"),
        (E, None),
        param=True,
        stream=1001,
        keep_float=True,
    ),
    _entry(_M + "router.bias", "moe.router.bias", VECTOR, (E, None)),
    _entry(
        _M + "experts.gate_up_proj",
        "moe.gate_up_proj.kernel",
        CONV1D,
        (E, "expert"),
        (D, "embed"),
        (FE2, "mlp"),
        param=True,
        stream=1002,
    ),
    _entry(_M + "experts.gate_up_proj_bias", "moe.gate_up_proj.bias", VECTOR, (E, "expert"), (FE2, "mlp")),
    _entry(
        _M + "experts.down_proj",
        "moe.down_proj.kernel",
        CONV1D,
        (E, "expert"),
        (FE, "mlp"),
        (D, "embed"),
        param=True,
        stream=1003,
    ),
    _entry(_M + "experts.down_proj_bias", "moe.down_proj.bias", VECTOR, (E, "expert"), (D, "embed")),
    _HEAD,
)

_H = "transformer.h.{i}."
_HA, _HM = _H + "attn.", _H + "mlp."
GPT2 = (
    _entry("transformer.wte.weight", "embed.embedding", EMBEDDING, (V, "vocab"), (D, "embed")),
    _entry("transformer.wpe.weight", "pos_embed.embedding", EMBEDDING, (P, None), (D, "embed")),
    _entry("transformer.ln_f.weight", "final_norm.scale", VECTOR, (D, None)),
    _entry("transformer.ln_f.bias", "final_norm.bias", VECTOR, (D, None)),
    _entry(_H + "ln_1.weight", "attn_norm.scale", VECTOR, (D, None)),
    _entry(_H + "ln_1.bias", "attn_norm.bias", VECTOR, (D, None)),
    _entry(_H + "ln_2.weight", "mlp_norm.scale", VECTOR, (D, None)),
    _entry(_H + "ln_2.bias", "mlp_norm.bias", VECTOR, (D, None)),
    _target(0, _HA + "c_attn.weight", "attn.c_attn.kernel", CONV1D, (D, "embed"), (QKV, "qkv")),
    _entry(_HA + "c_attn.bias", "attn.c_attn.bias", VECTOR, (QKV, "qkv")),
    _target(3, _HA + "c_proj.weight", "attn.c_proj.kernel", CONV1D, (Q, "q_heads"), (D, "embed")),
    _entry(_HA + "c_proj.bias", "attn.c_proj.bias", VECTOR, (D, "embed")),
    _target(4, _HM + "c_fc.weight", "mlp.c_fc.kernel", CONV1D, (D, "embed"), (I, "mlp")),
    _entry(_HM + "c_fc.bias", "mlp.c_fc.bias", VECTOR, (I, "mlp")),
    _target(6, _HM + "c_proj.weight", "mlp.c_proj.kernel", CONV1D, (I, "mlp"), (D, "embed")),
    _entry(_HM + "c_proj.bias", "mlp.c_proj.bias", VECTOR, (D, "embed")),
    _entry("lm_head.weight", "lm_head.kernel", LINEAR, (D, "embed"), (V, "vocab"), when=_untied),
)
# The causal-mask buffers older GPT-2 checkpoints saved.
GPT2_MASKS = r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"


def hf_shape(entry: Entry, cfg: DecoderConfig) -> tuple[int, ...]:
    """The shape HF stores for one tensor of one layer."""
    shape = entry.shape(cfg)
    if entry.layout == EXPERTS:  # transformers 5's fused [E, out, in]
        return (shape[0], shape[2], shape[1])
    if entry.layout == DEPTHWISE:
        return (shape[1], 1, shape[0])
    return shape[::-1] if entry.layout == LINEAR else shape


def part_shape(entry: Entry, cfg: DecoderConfig) -> tuple[int, int]:
    """The HF shape [out / len(parts), in] of one expert's part of an EXPERTS entry."""
    _, fan_in, fan_out = entry.shape(cfg)
    return (fan_out // len(entry.parts), fan_in)


def checkpoint_names(entry: Entry, cfg: DecoderConfig, layer: int | None) -> list[str]:
    """Every name the tensor may have in a checkpoint: its own, its alias, its per-expert parts."""
    names = [entry.hf_name(layer)]
    if entry.alias:
        names.append(entry.alias.format(i=layer))
    names += [p.format(i=layer, j=j) for p in entry.parts for j in range(cfg.num_experts)]
    return names
