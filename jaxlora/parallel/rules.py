"""Logical axis names of the parameter trees and the table that maps them to mesh axes.

Every array dimension has a logical name, given by the model spec (`jaxlora.models.spec`, one entry per
weight); `RULES` maps logical names to mesh axes (names not listed are replicated). See
`jaxlora.parallel.plan` for how a `Plan` turns them into `NamedSharding`s.
"""

from jaxlora.models.spec import logical_axes

# Logical dimension name -> mesh axis (or axes); names not listed are replicated. Qwen3.5's Gated DeltaNet
# dims are replicated on purpose: "linear_conv" (in_proj_qkv's output, [q; k; v] side by side, and the conv's
# channels), "linear_v" (Hv * Dv: in_proj_z's output, out_proj's input) and "linear_heads" (Hv); its
# kernels are still split along "embed" (fsdp).
RULES: dict[str, str | tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "expert": "expert",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}

# Params path -> logical names of its dims, from every family's spec.
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = logical_axes()

# (group, module) -> logical names of a per-layer linear kernel's (in, out), ("expert", in, out) for MoE
# experts; LoRA A/B follow them.
LINEAR_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    (path[1], path[2]): axes[1:]
    for path, axes in PARAM_AXES.items()
    if path[0] == "layers" and path[-1] == "kernel"
}


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical names of the dims of the (dense) parameter at `path` in the decoder's params tree; a path
    no spec knows is replicated."""
    return PARAM_AXES.get(tuple(path), (None,) * ndim)
