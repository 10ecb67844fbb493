"""Which attention implementation runs a case: `model.attention` resolved from static facts at trace time.

The facts: the JAX backend, the compute dtype, whether rows are packed (`Runtime.packed`, from
`data.packing`), the per-layer sliding windows against the sequence length, soft-capping, the head dim.

    auto on CPU          xla (the blocked kernel)
    auto on GPU          cudnn if it can run the case (half precision, unpacked rows, one window for
                         all layers, no soft-capping, no attention sinks), else pallas (jaxlora's own
                         kernel: packing, per-layer windows, soft-capping, sinks, any dtype; head dims up
                         to 256), else
                         reference with a one-line notice naming the feature that ruled them out
    explicit request     that implementation, or a one-line UserError naming the feature it lacks
"""

import logging

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig

log = logging.getLogger(__name__)

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_NOTICED: set[str] = set()


def static_window(cfg: DecoderConfig, t: int) -> int | None:
    """The one sliding window every layer applies to T tokens (0 = none), or None when layers differ.

    A window of at least T keys drops nothing (a query has at most T keys before it), so it counts as 0.
    """
    effective = {w if 0 < w < t else 0 for w in cfg.sliding_windows} or {0}
    return effective.pop() if len(effective) == 1 else None


def _max_head_dim() -> int:
    """cuDNN flash attention takes head dims up to 256 on Hopper and later, 128 before."""
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError, IndexError):
        return 128
    return 256 if major >= 9 else 128


PALLAS_MAX_HEAD_DIM = 256  # the Pallas kernel's tiles are sized for head dims up to 256 (`flash.flash_tiles`)


def lacks(impl: str, cfg: DecoderConfig, dtype, t: int, backend: str) -> str | None:
    """Why `impl` cannot run this case (the words after "model.attention=<impl>"), or None if it can."""
    if impl in ("reference", "xla"):
        return None
    kernel = "cuDNN flash attention" if impl == "cudnn" else "the Pallas Triton kernel"
    if backend != "gpu":
        return f"needs an NVIDIA GPU ({kernel}) but JAX runs on {backend!r} here"
    if impl == "pallas":  # any dtype, packing, windows per layer, soft-capping, sinks
        if cfg.head_dim > PALLAS_MAX_HEAD_DIM:
            return f"needs a head dim of at most {PALLAS_MAX_HEAD_DIM}, got {cfg.head_dim}"
        return None
    if jnp.dtype(dtype) not in HALF:
        return f"needs model.compute_dtype bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if cfg.attn_logit_softcap:
        return f"cannot soft-cap attention logits (attn_logit_softcap={cfg.attn_logit_softcap})"
    if cfg.attn_sinks:
        return "cannot add attention sinks (gpt-oss's per-head sink logits)"
    if cfg.runtime.packed:
        return "cannot keep packed examples apart (no segment ids; data.packing=true)"
    if static_window(cfg, t) is None:
        return f"cannot apply sliding windows that differ between layers {cfg.sliding_windows}"
    if cfg.head_dim % 8 or cfg.head_dim > _max_head_dim():
        return f"needs a head dim that is a multiple of 8 and at most {_max_head_dim()}, got {cfg.head_dim}"
    return None


def choose_attention(cfg: DecoderConfig, dtype, t: int, backend: str | None = None) -> str:
    """The implementation `attend` runs for T tokens in `dtype`: one of reference, xla, cudnn, pallas."""
    backend = backend or cfg.runtime.target_backend
    if cfg.runtime.attention != "auto":
        why = lacks(cfg.runtime.attention, cfg, dtype, t, backend)
        if why:
            raise UserError(f"model.attention={cfg.runtime.attention} {why}; use model.attention=auto or xla")
        return cfg.runtime.attention
    if backend != "gpu":
        return "xla"
    reasons = []
    for impl in ("cudnn", "pallas"):
        why = lacks(impl, cfg, dtype, t, backend)
        if why is None:
            return impl
        reasons.append(f"{impl} {why}")
    _notice(f"model.attention=auto: {'; '.join(reasons)}; using the reference attention (dense XLA)")
    return "reference"


def _notice(message: str) -> None:
    if message not in _NOTICED:
        _NOTICED.add(message)
        log.warning(message)
