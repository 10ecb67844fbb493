"""Folding a LoRA update into the base weights: `W + scale * A @ B`, written once (`merge_kernel`).

It serves the in-memory merge and unmerge of a whole parameter tree (on the device, jitted) and the merged
Hugging Face export (`save_merged`, on the host one layer at a time, so the export needs no second copy of
the model on the device).
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.adapters import lora_scale
from jaxlora.lora.config import LoraConfig
from jaxlora.lora.tokens import layer_groups, with_embeddings
from jaxlora.models.loading import Model
from jaxlora.models.lora_product import dora_factor
from jaxlora.models.saving import MAX_SHARD_BYTES, save_pretrained
from jaxlora.models.spec import Entry, layer_ids
from jaxlora.quant import QuantizedTensor, dequantize


def merge_kernel(kernel, a, b, scale, sign=1.0, magnitude=None) -> jax.Array:
    """`kernel + sign * scale * A @ B`, summed in float32 and cast back to the kernel's dtype.

    kernel: [..., in, out] (dense, or a `QuantizedTensor`, dequantized: the result is then a dense float
    kernel, since re-quantizing would throw most of the small update away), a: [..., in, r],
    b: [..., r, out], scale: a scalar or one per leading index ([L] for a stacked kernel).
    DoRA (`magnitude` m [..., out]): `(m / ||W + scale A @ B||) * (W + scale A @ B)` per output column,
    as PEFT merges it (only with sign 1: the column norm is not recoverable from the merged kernel).
    """
    if isinstance(kernel, QuantizedTensor):
        dense, dtype = dequantize(kernel, jnp.float32), kernel.dtype
    else:
        dense, dtype = jnp.asarray(kernel, jnp.float32), kernel.dtype
    delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision="highest")
    scale = jnp.asarray(scale, jnp.float32)
    wide = scale.reshape(scale.shape + (1,) * (delta.ndim - scale.ndim))  # [L] -> [L, 1, 1] ([L, 1, 1, 1])
    merged = dense + sign * wide * delta  # [..., in, out]
    if magnitude is not None:
        norm = jnp.sqrt(jnp.sum(merged * merged, axis=-2))  # [..., out]
        merged = merged * dora_factor(jnp.asarray(magnitude), norm, scale)[..., None, :]
    return merged.astype(dtype)


def module_scale(leaf: dict, scale) -> jax.Array:
    """This module's scale: the per-layer `scale` times its "s" leaf (rank/alpha patterns) if it has one."""
    return jnp.asarray(scale, jnp.float32) * jnp.asarray(leaf.get("s", 1.0), jnp.float32)


def _check_shapes(kernel, ab: dict, key: tuple[str, str]) -> None:
    a, b = ab["a"], ab["b"]
    if tuple(kernel.shape) != (*a.shape[:-1], b.shape[-1]) or a.shape[-1] != b.shape[-2]:
        raise UserError(
            f"LoRA for {'.'.join(key)} has A {list(a.shape)} and B {list(b.shape)} but the kernel is "
            f"{list(kernel.shape)}: the adapter belongs to a different base model"
        )


@jax.jit
def _merged_kernels(kernels: dict, lora: dict, scale, sign) -> dict:
    def one(kernel, leaf):
        return merge_kernel(kernel, leaf["a"], leaf["b"], module_scale(leaf, scale), sign, leaf.get("m"))

    return {g: {n: one(kernels[g][n], lora[g][n]) for n in mods} for g, mods in lora.items()}


def _apply(params: dict, lora: dict, scale, sign: float) -> dict:
    params, lora = with_embeddings(params, lora)
    if not lora:
        return params
    kernels: dict = {}
    for group, mods in lora.items():
        for name, ab in mods.items():
            kernel = params["layers"][group][name]["kernel"]
            _check_shapes(kernel, ab, (group, name))
            kernels.setdefault(group, {})[name] = kernel
    n_layers = next(iter(jax.tree.leaves(lora))).shape[0]
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n_layers,))
    merged = _merged_kernels(kernels, lora, scale, jnp.float32(sign))
    layers = dict(params["layers"])
    for group, mods in merged.items():
        layers[group] = dict(layers[group])
        for name, kernel in mods.items():
            layers[group][name] = dict(layers[group][name], kernel=kernel)
    return merged_biases(dict(params, layers=layers), lora, scale, sign)


def merged_biases(params: dict, lora: dict, scale, sign: float = 1.0) -> dict:
    """`params` with `bias + sign * scale * lora_bias` [L, out] on modules with PEFT's lora_bias ("bias")."""
    layers = dict(params["layers"])
    for group, mods in lora.items():
        for name, leaf in mods.items():
            if "bias" not in leaf:
                continue
            base = layers[group][name]
            if "bias" not in base:
                raise UserError(f"cannot merge lora_bias into {group}.{name}: the base layer has no bias")
            s = module_scale(leaf, scale)[:, None]  # [L, 1]
            bias = (jnp.asarray(base["bias"], jnp.float32) + sign * s * leaf["bias"]).astype(
                base["bias"].dtype
            )
            layers[group] = dict(layers[group])
            layers[group][name] = dict(base, bias=bias)
    return dict(params, layers=layers)


def merge(params: dict, lora: dict, scale) -> dict:
    """New params with `W + scale[l] * A[l] @ B[l]` in every targeted kernel [L, in, out].

    `scale` is a scalar or the [L] array from `lora_scale`. A quantized kernel comes back dense (see
    `merge_kernel`). The input tree is not modified; untouched leaves are shared.
    """
    return _apply(params, lora, scale, 1.0)


def unmerge(params: dict, lora: dict, scale) -> dict:
    """The inverse of `merge`: `W - scale[l] * A[l] @ B[l]` (exact up to float rounding). Not for DoRA."""
    if layer_groups(lora) != lora:
        raise UserError("unmerge cannot restore an embedding or LM head replaced by trained copies or rows")
    if any("m" in leaf for mods in lora.values() for leaf in mods.values()):
        raise UserError("a DoRA merge cannot be undone (the column norms are lost); keep the unmerged base")
    return _apply(params, lora, scale, -1.0)


def save_merged(
    out_dir,
    model: Model,
    lora: dict | None,
    lora_cfg: LoraConfig | None,
    tokenizer_src=None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the base with the LoRA update merged in as a Hugging Face checkpoint folder; return it.

    `dtype`: float32, bfloat16 or float16 (default: the source config.json's). Quantized base kernels are
    dequantized and the update is added to the dequantized weights. `lora=None` writes the (dequantized)
    base. Host memory peaks at one shard (see `models.saving.save_pretrained`).
    """
    lora = lora or {}
    cfg = model.config
    params, lora = with_embeddings(model.params, lora)  # trainable token rows written into the embedding
    vocab = params["embed"]["embedding"].shape[0]  # a resized vocabulary the adapter carries
    if vocab != cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    layers = params["layers"]
    for group, mods in lora.items():
        for name, ab in mods.items():
            if name not in layers.get(group, {}):
                raise UserError(f"LoRA tree has module {group}.{name} that this {cfg.model_type} model lacks")
            _check_shapes(layers[group][name]["kernel"], ab, (group, name))
    scale = lora_scale(cfg, lora_cfg) if lora else None
    if lora:
        params = merged_biases(params, lora, jnp.broadcast_to(jnp.asarray(scale), (cfg.num_layers,)))

    def add_update(entry: Entry, layer: int, kernel: np.ndarray) -> np.ndarray:  # kernel: [in, out]
        ab = lora.get(entry.path[1], {}).get(entry.path[2])
        if ab is None:
            return kernel
        row = layer_ids(entry, cfg).index(layer)  # its row in the stack (a hybrid model's mixers: [L_kind])
        a, b = np.asarray(ab["a"][row]), np.asarray(ab["b"][row])
        m = None if "m" not in ab else np.asarray(ab["m"][row])
        s = scale[layer] * (np.asarray(ab["s"][row]) if "s" in ab else 1.0)
        return np.asarray(merge_kernel(kernel, a, b, s, magnitude=m))

    return save_pretrained(
        out_dir,
        params,
        cfg,
        model.path,
        dtype=dtype,
        tokenizer_src=tokenizer_src,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        kernel_hook=add_update if lora else None,
    )
