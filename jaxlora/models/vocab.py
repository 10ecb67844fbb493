"""Grow the vocabulary for tokens added to the tokenizer, as transformers' `resize_token_embeddings` does.

transformers (`mean_resizing=True`, its default) draws each new row of the input embedding and of an
untied LM head from N(mean, 1e-9 * cov) of the old rows, and uses the mean itself when that covariance
is not positive definite. The draw here is the same distribution without forming the [D, D] covariance:
with X the centred old rows [V, D], `X.T @ g / sqrt(V)` for g ~ N(0, I_V) has covariance X.T X / V. When
V <= D that covariance is singular, and the rows are the mean, as in transformers. The draw comes from
numpy's generator seeded with the run's seed, so a run and its resume grow the same rows (transformers
draws from torch's global generator, so its rows are never reproducible bit for bit).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig
from jaxlora.quant import QuantizedTensor

EPSILON = 1e-9  # transformers' scale of the covariance


def mean_rows(old: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` new rows [count, D] float32 for the old rows `old` [V, D] (see the module docstring)."""
    old = np.asarray(old, np.float32)
    mean = old.mean(axis=0)
    if old.shape[0] <= old.shape[1]:
        return np.repeat(mean[None], count, axis=0)
    centred = old - mean
    g = rng.standard_normal((count, old.shape[0])).astype(np.float32)  # [count, V]
    noise = (g @ centred) / np.sqrt(old.shape[0])  # [count, D], covariance X.T X / V
    return (mean + np.sqrt(EPSILON) * noise).astype(np.float32)


def new_rows(params: dict, cfg: DecoderConfig, vocab_size: int, seed: int) -> dict:
    """The rows of the tokens `cfg.vocab_size .. vocab_size - 1`: {"embed": [k, D]} and, untied,
    {"lm_head": [k, D]}, float32 on the host."""
    count = vocab_size - cfg.vocab_size
    rng = np.random.default_rng(seed)
    rows = {"embed": mean_rows(jax.device_get(params["embed"]["embedding"]), count, rng)}
    if not cfg.tie_word_embeddings:
        kernel = params["lm_head"]["kernel"]  # [D, V]
        if isinstance(kernel, QuantizedTensor):
            raise UserError(
                "data.add_special_tokens grows the vocabulary, which needs a float LM head; keep lm_head "
                "in quant.skip"
            )
        rows["lm_head"] = mean_rows(np.asarray(jax.device_get(kernel)).T, count, rng)
    return rows


def grow_vocab(params: dict, cfg: DecoderConfig, rows: dict) -> tuple[dict, DecoderConfig]:
    """(`params` with `rows` (as `new_rows` gives them) appended to the embedding [V + k, D] and the
    untied LM head [D, V + k], the config with the new vocab_size)."""
    params = dict(params)
    emb = params["embed"]["embedding"]
    added = jnp.asarray(rows["embed"], emb.dtype)
    params["embed"] = {**params["embed"], "embedding": jnp.concatenate([emb, added])}
    if "lm_head" in rows:
        kernel = params["lm_head"]["kernel"]
        cols = jnp.asarray(rows["lm_head"], kernel.dtype).T  # [D, k]
        params["lm_head"] = {**params["lm_head"], "kernel": jnp.concatenate([kernel, cols], axis=1)}
    vocab = cfg.vocab_size + rows["embed"].shape[0]
    return params, dataclasses.replace(cfg, vocab_size=vocab)
