"""The GPU kernels: cuDNN flash attention (public JAX API) and jaxlora's Pallas (Triton) flash attention.

`jaxlora.models.attention.choose` says which cases each can run. Neither gets a dense [B, 1, T, T] mask:
- `cudnn_attention`: a library kernel wrapped: causal, GQA, one static sliding window
  (`local_window_size`) and right-padded rows (sequence lengths). No segment ids (packing) and no
  soft-capping.
- `pallas_attention`: our own kernel (`flash.flash_attention`; JAX 0.12 removed the example kernel this
  used to wrap): causal, GQA, packed segments, a traced sliding window, soft-capping and attention sinks.
  It also runs on the CPU with `interpret=True`, which is how the tests check its numbers.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.attention.blocked import RESIDUALS
from jaxlora.models.attention.flash import flash_attention


def with_named_residuals(fn):
    """`fn(q, k, v, aux)` with the same values and gradients, its backward-pass residuals named RESIDUALS.

    Library kernels do not name their residuals, so a `save_only_these_names` policy would run them again
    in the backward pass; this wrapper lets the `lean` policy keep them as it keeps ours. `aux` (segment
    ids or sequence lengths) is not differentiated.
    """

    @jax.custom_vjp
    def wrapped(q, k, v, aux):
        return fn(q, k, v, aux)

    def fwd(q, k, v, aux):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, aux), q, k, v)
        named = partial(checkpoint_name, name=RESIDUALS)
        return named(out), jax.tree.map(named, pullback)

    def bwd(pullback, d_out):
        return (*pullback(d_out), None)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _zero_padding(out: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Padding queries (segment 0) get zeros, as in `causal_attention`."""
    return out * (segment_ids != 0)[:, :, None, None].astype(out.dtype)


# --- cuDNN ---------------------------------------------------------------------------------------------


def cudnn_attention(
    q, k, v, positions, segment_ids, window: int = 0, softcap: float = 0.0, implementation: str = "cudnn"
) -> jax.Array:
    """cuDNN flash attention, unpacked right-padded rows: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    segment_ids: [B, T], 1 then 0 (padding); each row's length is its count of non-zero ids, and
    positions are taken to be 0, 1, ... (so `positions` is unused). window: a static Python int (0 =
    none); cuDNN's `local_window_size=(w - 1, 0)` keeps the same w keys as `delta < w`. `implementation`
    is "cudnn"; the tests pass "xla" to check these same arguments on the CPU.
    """
    del positions
    if softcap:
        raise ValueError("cuDNN attention has no logit soft-capping")
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)  # [B]
    call = partial(_cudnn_call, window=int(window), implementation=implementation)
    return _zero_padding(with_named_residuals(call)(q, k, v, lengths), segment_ids)


def _cudnn_call(q, k, v, lengths, window: int, implementation: str):
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    )


# --- Pallas ----------------------------------------------------------------------------------------------


def pallas_attention(
    q,
    k,
    v,
    positions,
    segment_ids,
    window=0,
    softcap: float = 0.0,
    *,
    sinks=None,
    block: int | None = None,
    block_bwd: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas flash attention: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H] in q's dtype.

    positions/segment_ids: [B, T] int32 (segment 0 = padding; padding queries get zeros); window: int32
    scalar, may be traced (0 = none); softcap: static float (0 = none); sinks: float32 [N] per-head sink
    logits or None. block/block_bwd: forward/backward tile lengths (powers of two >= 16; None = by head
    dim). `interpret=True` runs it on the CPU.
    """
    return flash_attention(
        q,
        k,
        v,
        positions,
        segment_ids,
        window,
        softcap,
        sinks,
        block=block,
        block_bwd=block_bwd,
        interpret=interpret,
    )
