"""Token embeddings in, logits out: the ends of the decoder (`jaxlora.models.decoder` re-exports them).

Shapes: B batch, T tokens, D hidden, V vocabulary.
"""

import math

import jax
import jax.numpy as jnp

from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.quant import as_kernel

Params = dict
F32 = jnp.float32


def default_positions(input_ids: jax.Array) -> jax.Array:
    """0, 1, ..., T - 1 for every row: [B, T] int32."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def embed(params: Params, cfg: DecoderConfig, input_ids, positions) -> jax.Array:
    """Token (and GPT-2 position) embeddings as the float32 residual stream [B, T, D].

    Gemma multiplies by sqrt(hidden) in the compute dtype, the constant rounded to it, as transformers.
    """
    h = jnp.take(params["embed"]["embedding"], input_ids, axis=0)
    if cfg.embed_scale:
        dt = jnp.dtype(cfg.runtime.compute_dtype)
        h = h.astype(dt) * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    h = h.astype(F32)
    if cfg.learned_positions:
        h = h + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(F32)
    return h


def lm_head_kernel(params: Params, cfg: DecoderConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].astype(dt).T
    return as_kernel(params["lm_head"]["kernel"], dt)


def logits_from_hidden(params: Params, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V] (soft-capped when the model asks)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    if cfg.tie_word_embeddings and dt != F32:  # the [V, D] table as stored: XLA:CPU runs a dot on its
        # transposed copy in float32 (1.7x slower); in float32 the copy is the faster layout there
        w, spec = params["embed"]["embedding"].astype(dt), "...d,vd->...v"
    else:
        w, spec = lm_head_kernel(params, cfg), "...d,dv->...v"
    return cap_logits(jnp.einsum(spec, hidden.astype(dt), w, preferred_element_type=F32), cfg)


def cap_logits(logits: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """Gemma 2's final-logit soft-capping, c * tanh(logits / c); the identity when the model has none."""
    c = cfg.final_logit_softcap
    return c * jnp.tanh(logits / c) if c else logits
