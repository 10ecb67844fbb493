"""Logical axis names of the parameter trees and the table that maps them to mesh axes.

Every array dimension has a logical name; `RULES` maps logical names to mesh axes (names not listed are
replicated). See `jaxlora.parallel.plan` for how a `Plan` turns them into `NamedSharding`s.
"""

# Logical dimension name -> mesh axis (or axes); names not listed are replicated.
RULES: dict[str, str | tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}

# (group, module) -> logical names of a linear kernel's (in, out).
LINEAR_AXES: dict[tuple[str, str], tuple[str, str]] = {
    ("attn", "q_proj"): ("embed", "q_heads"),
    ("attn", "k_proj"): ("embed", "kv_heads"),
    ("attn", "v_proj"): ("embed", "kv_heads"),
    ("attn", "o_proj"): ("q_heads", "embed"),
    ("attn", "c_attn"): ("embed", "qkv"),
    ("attn", "c_proj"): ("q_heads", "embed"),
    ("mlp", "gate_proj"): ("embed", "mlp"),
    ("mlp", "up_proj"): ("embed", "mlp"),
    ("mlp", "down_proj"): ("mlp", "embed"),
    ("mlp", "c_fc"): ("embed", "mlp"),
    ("mlp", "c_proj"): ("mlp", "embed"),
}


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical names of the dims of the (dense) parameter at `path` in the decoder's params tree."""
    if path[0] == "layers" and len(path) >= 4 and (path[1], path[2]) in LINEAR_AXES:
        fan_in, fan_out = LINEAR_AXES[(path[1], path[2])]
        return ("layers", fan_in, fan_out) if path[-1] == "kernel" else ("layers", fan_out)
    if path == ("embed", "embedding"):
        return ("vocab", "embed")
    if path == ("pos_embed", "embedding"):
        return (None, "embed")
    if path == ("lm_head", "kernel"):
        return ("embed", "vocab")
    return (None,) * ndim  # norms, q/k norms: small, replicated
