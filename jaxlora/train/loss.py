"""Cross-entropy over the vocabulary, computed in chunks so the float32 logits of the whole batch never
exist at once (the backward pass recomputes each chunk's logits instead of storing them).

Only positions that carry a target cost an LM-head matmul. With response-only labels (instruction data)
often half the positions are `IGNORE`; they are moved behind the targeted ones, and the chunks left with
no target skip the matmul (`lax.cond`, forward and backward alike). Shapes stay static under `jit`: the
chunk count is that of all positions, only the work of the empty ones is skipped.
"""

import jax
import jax.numpy as jnp

from jaxlora.data import IGNORE
from jaxlora.models.config import DecoderConfig
from jaxlora.models.decoder import cap_logits, lm_head_kernel


def compact_targets(h: jax.Array, t: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Move the positions that carry a target, in order, to the front; pad to `size` positions.

    h: [N, D], t: [N] -> (h [size, D], t [size], number of targets). The order is a permutation built
    with a cumsum (linear, no sort); the scatter has unique in-range indices, so its gradient is a gather.
    """
    n = t.shape[0]
    valid = t != IGNORE
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    ahead = jnp.cumsum(valid, dtype=jnp.int32)  # targets up to and including each position
    dest = jnp.where(valid, ahead - 1, n_valid + jnp.arange(n, dtype=jnp.int32) - ahead)  # [N]
    hs = jnp.zeros((size, h.shape[1]), h.dtype).at[dest].set(h, unique_indices=True)
    ts = jnp.full((size,), IGNORE, t.dtype).at[dest].set(t, unique_indices=True)
    return hs, ts, n_valid


def chunked_cross_entropy(
    params, cfg: DecoderConfig, hidden: jax.Array, targets: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL and the number of counted tokens.

    hidden: final-normed [B, T, D]; targets: [B, T] int32, already shifted, `IGNORE` (-100) where no loss.
    Returns (loss_sum, n_tokens), both float32 scalars; the mean is their ratio.
    """
    d = hidden.shape[-1]
    t = targets.reshape(-1)
    n = t.shape[0]
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    h, t, n_valid = compact_targets(hidden.reshape(-1, d), t, n_chunks * chunk)
    live = jnp.arange(n_chunks, dtype=jnp.int32) * chunk < n_valid  # [n_chunks] chunk holds a target
    w = lm_head_kernel(params, cfg)  # [D, V]
    dt = jnp.dtype(cfg.runtime.compute_dtype)

    def one(hc, tc):  # [C, D], [C] -> NLL summed over the chunk
        logits = jnp.einsum("nd,dv->nv", hc.astype(dt), w, preferred_element_type=jnp.float32)  # [C, V]
        logits = cap_logits(logits, cfg)  # Gemma 2's final soft-cap; the identity elsewhere
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = tc != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(valid, tc, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - picked, 0.0))

    def skip(hc, tc):
        return jnp.float32(0)

    # Checkpointed around the cond: inside it, the gradient held two more [C, V] buffers (measured).
    @jax.checkpoint
    def chunk_nll(hc, tc, on):
        return jax.lax.cond(on, one, skip, hc, tc)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    xs = (h.reshape(n_chunks, chunk, d), t.reshape(n_chunks, chunk), live)
    loss_sum, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return loss_sum, n_valid.astype(jnp.float32)
