"""The chunked cross-entropy equals the dense one (values and gradients), skips chunks without targets,
and never holds the float32 logits of the whole batch."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.data import IGNORE
from jaxlora.models.config import DecoderConfig
from jaxlora.train.loss import chunked_cross_entropy, compact_targets

B, T, D, V = 3, 40, 16, 48


def tiny_config(vocab: int = V, dim: int = D) -> DecoderConfig:
    return DecoderConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=dim,
        max_position_embeddings=T,
        norm_eps=1e-5,
    )


def dense_reference(params, hidden, targets):
    """Today's sum and count from the full [B, T, V] logits."""
    logits = jnp.einsum("btd,dv->btv", hidden, params["lm_head"]["kernel"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = targets != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), jnp.sum(valid).astype(jnp.float32)


def make_targets(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[B, T] targets: `none`, `all`, `prompt` (~30% targeted: response at the end of each row) or
    `packed` (several prompt/response examples per row, padding at the end)."""
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    if kind == "none":
        t[:] = IGNORE
    elif kind == "prompt":
        for r in range(B):
            t[r, : int(T * rng.uniform(0.6, 0.8))] = IGNORE
    elif kind == "packed":
        mask = np.ones((B, T), bool)
        for r in range(B):
            start = 0
            while start < T - 6:
                prompt, response = rng.integers(2, 6), rng.integers(1, 6)
                mask[r, start + prompt : start + prompt + response] = False
                start += prompt + response
        t[mask] = IGNORE
        t[:, -3:] = IGNORE  # right padding
    return t


@pytest.mark.parametrize("chunk", [7, 32, 1024])
@pytest.mark.parametrize("kind", ["none", "prompt", "packed", "all"])
def test_equals_dense_loss_and_gradients(kind, chunk):
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{chunk}".encode()))
    cfg = tiny_config()
    params = {"lm_head": {"kernel": jnp.asarray(rng.normal(0, 0.5, (D, V)), jnp.float32)}}
    hidden = jnp.asarray(rng.normal(0, 1, (B, T, D)), jnp.float32)
    targets = jnp.asarray(make_targets(kind, rng))
    if kind == "prompt":
        assert 0.15 < float(jnp.mean(targets != IGNORE)) < 0.45

    def ours(p, h):
        return chunked_cross_entropy(p, cfg, h, targets, chunk)

    def ref(p, h):
        return dense_reference(p, h, targets)

    (s, n), (gp, gh) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, hidden)
    (s_ref, n_ref), (gp_ref, gh_ref) = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(params, hidden)
    assert float(n) == float(n_ref) == float(jnp.sum(targets != IGNORE))
    np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gh, gh_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gp["lm_head"]["kernel"], gp_ref["lm_head"]["kernel"], rtol=1e-6, atol=1e-5)


def test_compaction_keeps_order_and_pads():
    h = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))  # [6, 2], row i holds i
    t = jnp.array([IGNORE, 5, IGNORE, 7, 8, IGNORE], jnp.int32)
    hs, ts, n = compact_targets(h, t, 8)
    assert int(n) == 3
    np.testing.assert_array_equal(ts, [5, 7, 8, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE])
    np.testing.assert_array_equal(hs[:, 0], [1, 3, 4, 0, 2, 5, 0, 0])


def test_chunks_without_targets_do_no_matmul():
    """Positions without a target hold NaN: the dense loss's backward would spread the NaN (0 * NaN in
    the softmax gradient) into every gradient; skipped chunks never touch them, so all stays finite."""
    rng = np.random.default_rng(0)
    cfg = tiny_config()
    w = jnp.asarray(rng.normal(0, 0.5, (D, V)), jnp.float32)
    targets = jnp.asarray(make_targets("all", rng)).at[:, : T // 2].set(IGNORE)  # 60 targets = 6 chunks
    hidden = jnp.asarray(rng.normal(0, 1, (B, T, D)), jnp.float32)
    hidden = jnp.where((targets == IGNORE)[..., None], jnp.nan, hidden)

    def loss(w, h):
        return chunked_cross_entropy({"lm_head": {"kernel": w}}, cfg, h, targets, 10)[0]

    s, (gw, gh) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, hidden)
    assert np.isfinite(float(s))
    assert np.all(np.isfinite(gw))
    assert np.all(np.isfinite(np.where((targets != IGNORE)[..., None], gh, 0.0)))
    _, (gw_dense, _) = jax.value_and_grad(
        lambda w, h: dense_reference({"lm_head": {"kernel": w}}, h, targets)[0], argnums=(0, 1)
    )(w, hidden)
    assert not np.all(np.isfinite(gw_dense))  # the NaN would have reached the gradient


def test_full_logits_never_exist():
    """The gradient's scratch memory stays far below the [N, V] float32 logits (N = 4096, V = 2048)."""
    n, vocab, dim, chunk = 4096, 2048, 32, 256
    cfg = tiny_config(vocab, dim)
    params = {"lm_head": {"kernel": jnp.ones((dim, vocab), jnp.float32)}}
    hidden = jnp.ones((2, n // 2, dim), jnp.float32)
    targets = jnp.zeros((2, n // 2), jnp.int32)
    grad = jax.jit(jax.grad(lambda h: chunked_cross_entropy(params, cfg, h, targets, chunk)[0]))
    stats = grad.lower(hidden).compile().memory_analysis()
    full_logits = n * vocab * 4
    assert stats.temp_size_in_bytes < full_logits / 4, (stats.temp_size_in_bytes, full_logits)


def test_final_logit_softcap_is_in_the_loss():
    """Gemma 2 caps the logits before the softmax: the loss must see the capped logits, as `forward` does."""
    import dataclasses

    from jaxlora.models.decoder import cap_logits

    rng = np.random.default_rng(7)
    cfg = dataclasses.replace(tiny_config(), final_logit_softcap=2.0)
    params = {"lm_head": {"kernel": jnp.asarray(rng.normal(0, 2.0, (D, V)), jnp.float32)}}
    hidden = jnp.asarray(rng.normal(0, 1, (B, T, D)), jnp.float32)
    targets = jnp.asarray(make_targets("prompt", rng))
    logits = cap_logits(jnp.einsum("btd,dv->btv", hidden, params["lm_head"]["kernel"]), cfg)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = targets != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    expected = jnp.sum(jnp.where(valid, lse - picked, 0.0))
    s, _ = chunked_cross_entropy(params, cfg, hidden, targets, 16)
    np.testing.assert_allclose(s, expected, rtol=1e-6)
    uncapped, _ = chunked_cross_entropy(params, tiny_config(), hidden, targets, 16)
    assert abs(float(uncapped) - float(expected)) > 1.0  # the cap matters at this logit scale
