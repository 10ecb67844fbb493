"""Cross-entropy over the vocabulary, computed in chunks so the float32 logits of the whole batch never
exist at once (the backward pass recomputes each chunk's logits instead of storing them)."""

import jax
import jax.numpy as jnp

from jaxlora.data import IGNORE
from jaxlora.models.config import DecoderConfig
from jaxlora.models.decoder import lm_head_kernel


def chunked_cross_entropy(
    params, cfg: DecoderConfig, hidden: jax.Array, targets: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL and the number of counted tokens.

    hidden: final-normed [B, T, D]; targets: [B, T] int32, already shifted, `IGNORE` (-100) where no loss.
    Returns (loss_sum, n_tokens), both float32 scalars; the mean is their ratio.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad), constant_values=IGNORE)
    w = lm_head_kernel(params, cfg)  # [D, V]
    dt = jnp.dtype(cfg.compute_dtype)

    @jax.checkpoint
    def one(hc, tc):
        logits = jnp.einsum("nd,dv->nv", hc.astype(dt), w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = tc != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(valid, tc, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - picked, 0.0)), jnp.sum(valid).astype(jnp.float32)

    def body(carry, xs):
        s, c = one(*xs)
        return (carry[0] + s, carry[1] + c), None

    hs = h.reshape(-1, chunk, d)
    ts = t.reshape(-1, chunk)
    (loss_sum, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (hs, ts))
    return loss_sum, count
