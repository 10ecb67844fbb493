"""Random parameters for an architecture (for smoke tests, benchmarks and the offline quickstart)."""

import jax
import jax.numpy as jnp

from jaxlora.models.config import DecoderConfig
from jaxlora.models.spec import VECTOR, name_table, stack_rows


def init_params(cfg: DecoderConfig, seed: int = 0, dtype: str = "float32", std: float = 0.02) -> dict:
    """Parameters with the layout `load_model` produces: kernels and embeddings ~ N(0, std), norm
    scales 1 (0 where the norm adds 1), biases 0. Generated one tensor at a time on the device."""
    key = jax.random.key(seed)
    params: dict = {}
    for n, e in enumerate(name_table(cfg)):
        shape = ((stack_rows(e, cfg),) if e.per_layer else ()) + e.shape(cfg)
        if e.layout == VECTOR:  # Gemma's norms scale by 1 + w (not Qwen3.5's gated DeltaNet norm)
            zero = e.path[-1] == "bias" or (cfg.norm_offset == 1.0 and "linear_attn" not in e.path)
            value = jnp.zeros(shape, dtype) if zero else jnp.ones(shape, dtype)
        else:
            value = (jax.random.normal(jax.random.fold_in(key, n), shape, jnp.float32) * std).astype(dtype)
        e.put(params, value)
    return params
