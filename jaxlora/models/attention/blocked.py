"""`causal_attention` (model.attention=xla): causal attention in blocks with a flash-style backward pass.

Hand-written rather than the dense reference under autodiff or `jax.nn.dot_product_attention(
implementation="xla")`, for two reasons measured on XLA:CPU (where there is no fused attention kernel):
- Memory: autodiff keeps three float32 [B, N, T, S] tensors per layer (scores, probabilities, mask) as
  residuals. The custom VJP keeps only q, k, v, the output and the log-sum-exp per query (FlashAttention's
  residuals) and recomputes the probabilities block by block in the backward pass.
- Work: query block i attends to keys 0 .. end of block i only (keys after a query are never attended
  to), so about half of the [T, S] score matrix is never computed. Every matmul is laid out as
  [batch, M, contract] x [batch, contract, N] with one contracting dimension (query rows m = (t, g)
  flattened), which XLA:CPU runs without transposing the large operand.

Soft-capping (Gemma 2) replaces the scaled score s by c * tanh(s / c); its derivative 1 - tanh^2(s / c)
multiplies the score gradient in the backward pass.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

F32 = jnp.float32
NEG_INF = float(jnp.finfo(jnp.float32).min)
TINY = float(jnp.finfo(jnp.float32).tiny)
RESIDUALS = "attention_residuals"  # checkpoint name of what the attention backward pass reads


def attention_block_size(t: int) -> int:
    """Query/key block length for `causal_attention`: 64, or T/16 rounded up to 64 for long sequences."""
    return max(64, -(-t // 16 // 64) * 64)


def _allowed(q_pos, q_seg, q_idx, k_pos, k_seg, k_idx, window) -> jax.Array:
    """Broadcastable bool: same non-padding segment, causal by position and by index, inside the window."""
    delta = q_pos - k_pos
    return (
        (q_seg == k_seg) & (k_seg != 0) & (delta >= 0) & ((window == 0) | (delta < window)) & (k_idx <= q_idx)
    )


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, t)) for i in range(0, t, block)]


def _capped(s: jax.Array, softcap: float) -> tuple[jax.Array, jax.Array | None]:
    """(scores after soft-capping, tanh(s / c) for the backward pass, or None when softcap is 0)."""
    if not softcap:
        return s, None
    th = jnp.tanh(s / softcap)
    return softcap * th, th


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def causal_attention(q, k, v, positions, segment_ids, window, block: int, softcap: float = 0.0) -> jax.Array:
    """Causal grouped-query self-attention with packed segments, an optional sliding window and soft-cap.

    q: [B, T, N, H], k/v: [B, T, K, H], positions/segment_ids: [B, T] int32 (segment 0 = padding),
    window: int32 scalar (0 = none), block: static block length, softcap: static float (0 = none).
    Returns [B, T, N, H] in q's dtype. Same result as the dense reference for every query that has a key
    to attend to (a key after its query in the row is never one); a query with none (padding) gets zeros.
    """
    return _attention_fwd(q, k, v, positions, segment_ids, window, block, softcap)[0]


def _attention_fwd(q, k, v, positions, segment_ids, window, block, softcap=0.0):
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h)
    qm = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)  # [B, K, M, H]
    k_t = k.transpose(0, 2, 3, 1)  # [B, K, H, S]
    v_s = v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    pos, seg, idx = positions, segment_ids, jnp.arange(t)
    outs, lses = [], []
    for q0, q1 in _spans(t, block):
        s = jnp.einsum(
            "bkmh,bkhs->bkms", qm[:, :, q0 * g : q1 * g], k_t[..., :q1], preferred_element_type=F32
        )
        ok = _allowed(
            pos[:, q0:q1, None],
            seg[:, q0:q1, None],
            idx[q0:q1, None],
            pos[:, None, :q1],
            seg[:, None, :q1],
            idx[None, :q1],
            window,
        )  # [B, bq, S]
        ok = jnp.broadcast_to(ok[:, None, :, None], (b, kh, q1 - q0, g, q1)).reshape(s.shape)
        s = jnp.where(ok, _capped(s * scale, softcap)[0], NEG_INF)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(ok, jnp.exp(s - m), 0.0)
        total = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), TINY)
        o = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v_s[:, :, :q1], preferred_element_type=F32)
        outs.append(o / total)
        lses.append((m + jnp.log(total))[..., 0])
    o = jnp.concatenate(outs, axis=2).astype(q.dtype)  # [B, K, M, H]
    out = checkpoint_name(o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h), RESIDUALS)
    lse = checkpoint_name(jnp.concatenate(lses, axis=2), RESIDUALS)  # [B, K, M]
    return out, (q, k, v, positions, segment_ids, window, out, lse)


def _attention_bwd(block, softcap, res, d_out):
    q, k, v, positions, segment_ids, window, out, lse = res  # lse: [B, K, M]
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    m = t * g
    scale = 1.0 / math.sqrt(h)
    q5, do5 = q.reshape(b, t, kh, g, h), d_out.reshape(b, t, kh, g, h)
    qm, dom = (x.transpose(0, 2, 1, 3, 4).reshape(b, kh, m, h) for x in (q5, do5))  # [B, K, M, H]
    q_t, do_t = (x.transpose(0, 2, 4, 1, 3).reshape(b, kh, h, m) for x in (q5, do5))  # [B, K, H, M]
    k_s, v_s = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    k_t = k.transpose(0, 2, 3, 1)  # [B, K, H, S]
    o5 = out.reshape(b, t, kh, g, h).astype(F32)
    delta = jnp.sum(do5.astype(F32) * o5, axis=-1).transpose(0, 2, 1, 3).reshape(b, kh, m)  # [B, K, M]
    pos, seg, idx = positions, segment_ids, jnp.arange(t)
    dks, dvs, dq_t = [], [], jnp.zeros((b, kh, h, m), F32)
    # Key block j meets the queries from its own start on; everything is computed transposed, [S, M].
    for k0, k1 in _spans(t, block):
        rows = slice(k0 * g, m)
        s_t = jnp.einsum("bksh,bkhm->bksm", k_s[:, :, k0:k1], q_t[..., rows], preferred_element_type=F32)
        ok = _allowed(
            pos[:, None, k0:],
            seg[:, None, k0:],
            idx[None, k0:],
            pos[:, k0:k1, None],
            seg[:, k0:k1, None],
            idx[k0:k1, None],
            window,
        )  # [B, bk, T - k0]
        ok = jnp.broadcast_to(ok[:, None, :, :, None], (b, kh, k1 - k0, t - k0, g)).reshape(s_t.shape)
        s_t, th = _capped(s_t * scale, softcap)
        p_t = jnp.where(ok, jnp.exp(s_t - lse[:, :, None, rows]), 0.0)
        dvs.append(
            jnp.einsum("bksm,bkmh->bksh", p_t.astype(v.dtype), dom[:, :, rows], preferred_element_type=F32)
        )
        dp_t = jnp.einsum("bksh,bkhm->bksm", v_s[:, :, k0:k1], do_t[..., rows], preferred_element_type=F32)
        ds_t = p_t * (dp_t - delta[:, :, None, rows]) * scale
        if th is not None:  # d/ds of c * tanh(s / c)
            ds_t = ds_t * (1.0 - th * th)
        ds_t = ds_t.astype(q.dtype)
        dks.append(jnp.einsum("bksm,bkmh->bksh", ds_t, qm[:, :, rows], preferred_element_type=F32))
        dq_blk = jnp.einsum("bkhs,bksm->bkhm", k_t[..., k0:k1], ds_t, preferred_element_type=F32)
        dq_t = dq_t.at[..., rows].add(dq_blk)
    dq = dq_t.astype(q.dtype).reshape(b, kh, h, t, g).transpose(0, 3, 1, 4, 2).reshape(b, t, n, h)
    dk = jnp.concatenate(dks, axis=2).astype(k.dtype).transpose(0, 2, 1, 3)
    dv = jnp.concatenate(dvs, axis=2).astype(v.dtype).transpose(0, 2, 1, 3)
    return dq, dk, dv, None, None, None


causal_attention.defvjp(_attention_fwd, _attention_bwd)
