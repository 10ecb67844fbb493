"""The GPU kernels: cuDNN flash attention (public JAX API) and JAX's Pallas (Triton) flash attention.

Both are library kernels wrapped, not written here; `jaxlora.models.attention.choose` says which cases
each can run. Neither gets a dense [B, 1, T, T] mask:
- `cudnn_attention`: causal, GQA, one static sliding window (`local_window_size`) and right-padded rows
  (sequence lengths). No segment ids (packing) and no soft-capping.
- `pallas_attention`: `jax.experimental.pallas.ops.gpu.attention.mha`, causal with segment ids, so packed
  rows work. It has no GQA (key/value heads are repeated), no sliding window and no soft-capping. It also
  runs on the CPU with `interpret=True`, which is how the tests check its numbers. JAX 0.12 removed that
  example kernel (the Pallas Triton backend stays): `pallas_kernel_missing` says so, `choose` then never
  picks it, and an explicit request is refused in one line.
"""

import importlib
from functools import cache, partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.errors import UserError
from jaxlora.models.attention.blocked import RESIDUALS


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

PALLAS_MODULE = "jax.experimental.pallas.ops.gpu.attention"


@cache
def pallas_kernel_missing() -> str | None:
    """Why this JAX has no Pallas attention kernel (the words after "needs ..."), or None if it has one."""
    try:
        importlib.import_module(PALLAS_MODULE)
    except ImportError:
        return f"{PALLAS_MODULE}, which jax {jax.__version__} does not ship (JAX 0.12 removed it)"
    return None


def pallas_tiles(t: int, block: int = 128, block_bwd: int = 32) -> tuple[int, int, int]:
    """(padded length, forward tile, backward tile) for `pallas_attention` on T tokens.

    Triton tiles are powers of two; the kernel needs T to be a multiple of both tiles, so short rows use
    one tile of next_power_of_2(T) and long rows are padded up to a multiple of `block`.
    """
    tile = min(block, 1 << max(t - 1, 1).bit_length())
    bwd = min(block_bwd, tile)
    return -(-t // tile) * tile, tile, bwd


def pallas_attention(
    q,
    k,
    v,
    positions,
    segment_ids,
    window=0,
    softcap: float = 0.0,
    *,
    block: int = 128,
    block_bwd: int = 32,
    interpret: bool = False,
) -> jax.Array:
    """Pallas flash attention with packed segments: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

    The kernel masks by segment equality and by index (key index <= query index), which equals the
    reference's position mask when positions restart at 0 in each segment and count up by one, as the
    loader builds them (`positions` is unused). Padding (segment 0) never meets a real segment; padding
    queries get zeros. `window` and `softcap` must be 0 (the kernel has neither; `choose` never picks
    it then). T is padded with segment-0 tokens up to a whole number of tiles.
    """
    missing = pallas_kernel_missing()
    if missing:
        raise UserError(f"model.attention=pallas needs {missing}; use model.attention=auto, cudnn or xla")
    pallas_mha = importlib.import_module(PALLAS_MODULE)
    del positions
    if softcap or (isinstance(window, int) and window):
        raise ValueError("the Pallas attention kernel has no sliding window and no soft-capping")
    b, t, n, h = q.shape
    g = n // k.shape[2]
    tp, tile, bwd = pallas_tiles(t, block, block_bwd)
    sizes = pallas_mha.BlockSizes(
        block_q=tile, block_k=tile, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )

    def call(q, k, v, seg):
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [B, T, N, H]: the kernel has no GQA
        pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))  # [B, Tp, N, H]
        seg = jnp.pad(seg, ((0, 0), (0, tp - t)))  # [B, Tp], padding is segment 0
        out = pallas_mha.mha(
            q, k, v, seg, sm_scale=h**-0.5, causal=True, block_sizes=sizes, interpret=interpret
        )
        return out[:, :t]

    return _zero_padding(with_named_residuals(call)(q, k, v, segment_ids), segment_ids)
