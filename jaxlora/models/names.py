"""The one name table: Hugging Face tensor names <-> jaxlora parameter paths, with layout rules.

Used by loading, merged saving and PEFT import/export alike.
"""

import dataclasses

from jaxlora.models.config import DecoderConfig

# Layouts: "linear" = torch nn.Linear [out, in] (transposed to [in, out]); "conv1d" = GPT-2 Conv1D,
# already [in, out]; "vector" = norms and biases; "embedding" = [rows, D].
LINEAR, CONV1D, VECTOR, EMBEDDING = "linear", "conv1d", "vector", "embedding"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: HF name (with `{i}` for the layer index), jaxlora path, layout, per-layer or not."""

    hf: str
    path: tuple[str, ...]
    layout: str
    per_layer: bool

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer) if self.per_layer else self.hf


@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A linear layer LoRA can target: its HF module name (`q_proj`), path and HF module prefix."""

    name: str
    path: tuple[str, ...]
    hf_prefix: str  # "model.layers.{i}.self_attn.q_proj"
    fan_in_fan_out: bool


def _llama_entries(cfg: DecoderConfig) -> list[Entry]:
    L = "model.layers.{i}."
    out = [
        Entry("model.embed_tokens.weight", ("embed", "embedding"), EMBEDDING, False),
        Entry("model.norm.weight", ("final_norm", "scale"), VECTOR, False),
        Entry(L + "input_layernorm.weight", ("layers", "attn_norm", "scale"), VECTOR, True),
        Entry(L + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), VECTOR, True),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(Entry(L + f"self_attn.{name}.weight", ("layers", "attn", name, "kernel"), LINEAR, True))
        if cfg.o_bias if name == "o_proj" else cfg.qkv_bias:
            out.append(Entry(L + f"self_attn.{name}.bias", ("layers", "attn", name, "bias"), VECTOR, True))
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            out.append(Entry(L + f"self_attn.{name}.weight", ("layers", "attn", name, "scale"), VECTOR, True))
    for name in ("gate_proj", "up_proj", "down_proj"):
        out.append(Entry(L + f"mlp.{name}.weight", ("layers", "mlp", name, "kernel"), LINEAR, True))
        if cfg.mlp_bias:
            out.append(Entry(L + f"mlp.{name}.bias", ("layers", "mlp", name, "bias"), VECTOR, True))
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), LINEAR, False))
    return out


def _gpt2_entries(cfg: DecoderConfig) -> list[Entry]:
    L = "transformer.h.{i}."
    out = [
        Entry("transformer.wte.weight", ("embed", "embedding"), EMBEDDING, False),
        Entry("transformer.wpe.weight", ("pos_embed", "embedding"), EMBEDDING, False),
        Entry("transformer.ln_f.weight", ("final_norm", "scale"), VECTOR, False),
        Entry("transformer.ln_f.bias", ("final_norm", "bias"), VECTOR, False),
    ]
    for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        out.append(Entry(L + f"{hf}.weight", ("layers", ours, "scale"), VECTOR, True))
        out.append(Entry(L + f"{hf}.bias", ("layers", ours, "bias"), VECTOR, True))
    for group, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
        out.append(Entry(L + f"{group}.{name}.weight", ("layers", group, name, "kernel"), CONV1D, True))
        out.append(Entry(L + f"{group}.{name}.bias", ("layers", group, name, "bias"), VECTOR, True))
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), LINEAR, False))
    return out


def name_table(cfg: DecoderConfig) -> list[Entry]:
    """Every tensor of the HF checkpoint for this architecture."""
    return _gpt2_entries(cfg) if cfg.model_type == "gpt2" else _llama_entries(cfg)


def linear_modules(cfg: DecoderConfig) -> list[LinearModule]:
    """The per-layer linear layers (LoRA candidates; the LM head is never one), in HF order."""
    mods = []
    for e in name_table(cfg):
        if e.per_layer and e.layout in (LINEAR, CONV1D):
            prefix = e.hf.removesuffix(".weight")
            mods.append(LinearModule(e.path[-2], e.path[:-1], prefix, e.layout == CONV1D))
    return mods


def linear_dims(cfg: DecoderConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(group, module) -> (in_features, out_features) for every per-layer linear layer."""
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    if cfg.model_type == "gpt2":
        return {
            ("attn", "c_attn"): (d, q + 2 * kv),
            ("attn", "c_proj"): (q, d),
            ("mlp", "c_fc"): (d, i),
            ("mlp", "c_proj"): (i, d),
        }
    return {
        ("attn", "q_proj"): (d, q),
        ("attn", "k_proj"): (d, kv),
        ("attn", "v_proj"): (d, kv),
        ("attn", "o_proj"): (q, d),
        ("mlp", "gate_proj"): (d, i),
        ("mlp", "up_proj"): (d, i),
        ("mlp", "down_proj"): (i, d),
    }


def hf_shape(entry: Entry, cfg: DecoderConfig) -> tuple[int, ...]:
    """The shape HF stores for one tensor of one layer."""
    path = entry.path
    if path[0] == "embed":
        return (cfg.vocab_size, cfg.hidden_size)
    if path[0] == "pos_embed":
        return (cfg.max_position_embeddings, cfg.hidden_size)
    if path[0] == "lm_head":
        return (cfg.vocab_size, cfg.hidden_size)
    if path[0] == "final_norm" or path[1] in ("attn_norm", "mlp_norm"):
        return (cfg.hidden_size,)
    if path[2] in ("q_norm", "k_norm"):
        return (cfg.head_dim,)
    fan_in, fan_out = linear_dims(cfg)[(path[1], path[2])]
    if path[-1] == "bias":
        return (fan_out,)
    return (fan_in, fan_out) if entry.layout == CONV1D else (fan_out, fan_in)
