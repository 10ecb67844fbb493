"""Rotary position embeddings as transformers computes them: inverse frequencies with `linear`, `llama3`,
`longrope` and `yarn` scaling, per-layer tables (Gemma 3's and Olmo 3's local layers, SmolLM3's NoPE
layers) and the rotation itself, half-split, on the first `rope_dim` dims of each head (Phi-3's partial
rotary).

R = `cfg.rope_dim` (the rotated dims of a head), L layers, B batch, T tokens, N heads, H head dim.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.config import DecoderConfig

F32 = jnp.float32


class LayerRope(NamedTuple):
    """RoPE inverse frequencies [.., R/2] with the cos/sin factor of each layer [..]: what `layer_inv_freq`
    returns when the factor differs between layers (Olmo 3: YaRN's on the full layers only)."""

    inv_freq: jax.Array
    factor: jax.Array


def _default_inv_freq(theta: float, dim: int) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))  # [dim/2]


def rope_inv_freq(cfg: DecoderConfig, positions: jax.Array | None = None) -> jax.Array:
    """Global inverse frequencies [R/2] (R = `cfg.rope_dim`) with `linear`, `llama3`, `longrope` or `yarn`
    scaling.

    longrope picks the long factors when the batch reaches past the original length (max position + 1 >
    `rope_original_max_positions`), the short ones otherwise, as transformers does per forward call.
    """
    inv = _default_inv_freq(cfg.rope_theta, cfg.rope_dim)
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "longrope":
        short = jnp.asarray(cfg.rope_short_factor, F32)
        long = jnp.asarray(cfg.rope_long_factor, F32)
        if positions is None:
            return inv / short
        beyond = jnp.max(positions) + 1 > cfg.rope_original_max_positions
        return inv / jnp.where(beyond, long, short)
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    if cfg.rope_type == "yarn":
        return _yarn(cfg, inv)
    return inv


def _yarn(cfg: DecoderConfig, inv: jax.Array) -> jax.Array:
    """YaRN: interpolated (inv / factor) below the dims whose rotations in the original length fall under
    `rope_beta_slow`, original above `rope_beta_fast`, a linear ramp between (transformers' formula)."""
    dim, base, old = cfg.rope_dim, cfg.rope_theta, cfg.rope_original_max_positions

    def dim_of(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=F32) - low) / (high - low), 0, 1)  # [R/2]
    return inv / cfg.rope_factor * ramp + inv * (1 - ramp)


def layer_inv_freq(cfg: DecoderConfig, positions: jax.Array) -> jax.Array | LayerRope:
    """Per-layer inverse frequencies [L, R/2], scanned with the layers (`cfg.layer_rope`): the global
    ones, the local ones of Gemma 3 and Olmo 3 (base `rope_local_theta`, no scaling) or zeros (a NoPE
    layer: angle 0). With a cos/sin factor (`rope_attention_factor`, global layers only) and local or
    NoPE layers beside the global ones, a `LayerRope` that also holds each layer's factor [L]."""
    glob = rope_inv_freq(cfg, positions)
    kinds = cfg.layer_rope or ("global",) * cfg.num_layers
    if set(kinds) == {"global"}:
        return jnp.broadcast_to(glob, (cfg.num_layers, *glob.shape))
    table = {"global": glob, "none": jnp.zeros_like(glob)}
    if "local" in kinds:
        table["local"] = _default_inv_freq(cfg.rope_local_theta, cfg.rope_dim)
    inv = jnp.stack([table[k] for k in kinds])
    if cfg.rope_attention_factor == 1.0:
        return inv
    factor = [cfg.rope_attention_factor if k == "global" else 1.0 for k in kinds]
    return LayerRope(inv, jnp.asarray(factor, F32))


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array | LayerRope, scale: float = 1.0
) -> jax.Array:
    """HF's half-split RoPE on the first R = 2 * len(inv_freq) dims of each head (the rest pass through).

    x: [B, T, N, H], positions: [B, T], inv_freq: [R/2] -> [B, T, N, H]; `scale` multiplies cos and sin
    (longrope's and YaRN's attention factor). A `LayerRope` (one layer's: [R/2] and []) brings its own
    factor, which replaces `scale`.
    """
    if isinstance(inv_freq, LayerRope):
        inv_freq, scale = inv_freq
    r = 2 * inv_freq.shape[-1]
    angles = positions[..., None].astype(F32) * inv_freq  # [B, T, R/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]  # [B, T, 1, R]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    if isinstance(scale, jax.Array) or scale != 1.0:
        cos, sin = cos * scale, sin * scale
    xf = x.astype(F32)
    xr = xf[..., :r]  # [B, T, N, R]
    half = r // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos + rotated * sin
    if r < x.shape[-1]:
        out = jnp.concatenate([out, xf[..., r:]], axis=-1)
    return out.astype(x.dtype)
