"""One decoder-only transformer for Llama, Mistral, Qwen2, Qwen3 and GPT-2, as pure functions.

Parameters are a nested dict (a pytree) with HF's module names for every linear layer, so LoRA targets,
loading and PEFT export all use one vocabulary. Layer parameters are stacked on a leading axis `L` and
run with `jax.lax.scan`, so compile time does not grow with depth (`cfg.scan_layers=False` unrolls).

    params = {
      "embed": {"embedding": [V, D]},          "pos_embed": {"embedding": [P, D]}   (GPT-2)
      "layers": {
        "attn_norm": {"scale": [L, D], "bias"?},  "mlp_norm": {...},
        "attn": {"q_proj" | "k_proj" | "v_proj" | "o_proj" | "c_attn" | "c_proj":
                     {"kernel": [L, in, out], "bias"?},
                 "q_norm"?, "k_norm"?: {"scale": [L, H]}},
        "mlp": {"gate_proj" | "up_proj" | "down_proj" | "c_fc" | "c_proj": {"kernel": [L, in, out], "bias"?}},
      },
      "final_norm": {"scale": [D], "bias"?},  "lm_head": {"kernel": [D, V]}  (absent when tied)
    }

A linear `kernel` may also be a `jaxlora.quant.QuantizedTensor`; `lora` mirrors the targeted linear
layers with `{"a": [L, in, r], "b": [L, r, out]}` and is added as `base(x) + scale * B(A(dropout(x)))`.
Norms, softmax and logits run in float32; matmuls in `cfg.compute_dtype`.
"""

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig
from jaxlora.quant import as_kernel, qmatmul

Params = dict[str, Any]
F32 = jnp.float32
NEG_INF = float(jnp.finfo(jnp.float32).min)
TINY = float(jnp.finfo(jnp.float32).tiny)


def linear(
    p: Params, x: jax.Array, dtype, lora: Params | None = None, lora_scale=None, drop=None
) -> jax.Array:
    """`x @ kernel + bias`, plus the LoRA update when `lora` holds {"a", "b"} for this layer.

    x: [..., in] -> [..., out]. `lora_scale` is alpha/r (times a 0/1 per-layer mask); `drop` is an
    optional function applying dropout to the LoRA input.
    """
    y = qmatmul(x, p["kernel"], dtype)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if lora is not None:
        xa = x if drop is None else drop(x)
        a = lora["a"]
        delta = lora_product(xa.astype(a.dtype), a, lora["b"]) * lora_scale
        y = (y.astype(jnp.float32) + delta).astype(dtype)
    return y


@jax.custom_vjp
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x @ a) @ b`: x [..., in], a [in, r], b [r, out] -> [..., out], with a hand-written backward pass.

    The backward pass computes dA as [r, in] and transposes that small result, so no [tokens, in]
    activation is transposed (autodiff's [in, r] orientation costs XLA:CPU a transpose or a slow dot).
    """
    return jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)


def _lora_product_fwd(x, a, b):
    xa = jnp.einsum("...i,ir->...r", x, a)
    return jnp.einsum("...r,ro->...o", xa, b), (x, xa, a, b)


def _lora_product_bwd(res, g):
    x, xa, a, b = res
    x2, xa2, g2 = x.reshape(-1, a.shape[0]), xa.reshape(-1, a.shape[1]), g.reshape(-1, b.shape[1])
    g_xa = g2 @ b.T  # [N, r]
    dx = (g_xa @ a.T).reshape(x.shape)
    da_t = jax.lax.optimization_barrier(jnp.einsum("nr,ni->ri", g_xa, x2))  # keep the [r, in] orientation
    db = jnp.einsum("nr,no->ro", xa2, g2)
    return dx, da_t.T, db


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


def norm(p: Params, x: jax.Array, cfg: DecoderConfig) -> jax.Array:
    """RMSNorm or LayerNorm (per `cfg.norm`) computed in float32, returned in float32."""
    x = x.astype(jnp.float32)
    if cfg.norm == "rms":
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return x * p["scale"].astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return x * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def rope_inv_freq(cfg: DecoderConfig) -> jax.Array:
    """Inverse frequencies [H/2] with `linear` or `llama3` scaling applied."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF's half-split RoPE. x: [B, T, N, H], positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_pos, q_seg, kv_pos, kv_seg, window) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment, key not padding, causal by position, inside the window.

    Segment id 0 marks padding. `window` is a traced int; 0 means no sliding window.
    """
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    delta = q_pos[:, :, None] - kv_pos[:, None, :]
    causal = delta >= 0
    in_window = (window == 0) | (delta < window)
    return (same & causal & in_window)[:, None]


def dot_attention(q, k, v, mask, cfg: DecoderConfig) -> jax.Array:
    """Dense grouped-query attention (the KV-cache path and the reference for `causal_attention`).

    q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, 1, T, S] -> [B, T, N, H].
    """
    b, t, n, h = q.shape
    g = n // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


# --- causal attention in blocks, for training and prefill (no cache) --------------------------------
#
# Query block i attends to keys 0 .. end of block i only (keys after a query are never attended to), so
# about half of the [T, S] score matrix is never computed. A custom VJP keeps only q, k, v, the output
# and the log-sum-exp per query (FlashAttention's residuals) and recomputes the probabilities block by
# block in the backward pass; plain autodiff would store three float32 [B, N, T, S] tensors per layer.
# Every matmul is laid out as [batch, M, contract] x [batch, contract, N] with one contracting dimension
# (query rows m = (t, g) flattened), which XLA:CPU runs without transposing the large operand.


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


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def causal_attention(q, k, v, positions, segment_ids, window, block: int) -> jax.Array:
    """Causal grouped-query self-attention with packed segments and an optional sliding window.

    q: [B, T, N, H], k/v: [B, T, K, H], positions/segment_ids: [B, T] int32 (segment 0 = padding),
    window: int32 scalar (0 = none), block: static block length. Returns [B, T, N, H] in q's dtype.
    Same result as `dot_attention` with `attention_mask` for every query that has a key to attend to
    (a key after its query in the row is never one); a query with none (padding) gets zeros.
    """
    return _attention_fwd(q, k, v, positions, segment_ids, window, block)[0]


def _attention_fwd(q, k, v, positions, segment_ids, window, block):
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
        s = jnp.where(ok, s * scale, NEG_INF)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(ok, jnp.exp(s - m), 0.0)
        total = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), TINY)
        o = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v_s[:, :, :q1], preferred_element_type=F32)
        outs.append(o / total)
        lses.append((m + jnp.log(total))[..., 0])
    o = jnp.concatenate(outs, axis=2).astype(q.dtype)  # [B, K, M, H]
    out = o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    return out, (q, k, v, positions, segment_ids, window, out, jnp.concatenate(lses, axis=2))


def _attention_bwd(block, res, d_out):
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
        p_t = jnp.where(ok, jnp.exp(s_t * scale - lse[:, :, None, rows]), 0.0)
        dvs.append(
            jnp.einsum("bksm,bkmh->bksh", p_t.astype(v.dtype), dom[:, :, rows], preferred_element_type=F32)
        )
        dp_t = jnp.einsum("bksh,bkhm->bksm", v_s[:, :, k0:k1], do_t[..., rows], preferred_element_type=F32)
        ds_t = (p_t * (dp_t - delta[:, :, None, rows]) * scale).astype(q.dtype)
        dks.append(jnp.einsum("bksm,bkmh->bksh", ds_t, qm[:, :, rows], preferred_element_type=F32))
        dq_blk = jnp.einsum("bkhs,bksm->bkhm", k_t[..., k0:k1], ds_t, preferred_element_type=F32)
        dq_t = dq_t.at[..., rows].add(dq_blk)
    dq = dq_t.astype(q.dtype).reshape(b, kh, h, t, g).transpose(0, 3, 1, 4, 2).reshape(b, t, n, h)
    dk = jnp.concatenate(dks, axis=2).astype(k.dtype).transpose(0, 2, 1, 3)
    dv = jnp.concatenate(dvs, axis=2).astype(v.dtype).transpose(0, 2, 1, 3)
    return dq, dk, dv, None, None, None


causal_attention.defvjp(_attention_fwd, _attention_bwd)


def cudnn_attention(q, k, v, mask) -> jax.Array:
    """cuDNN flash attention (causal, GQA; packed segments and sliding windows through `mask`).

    Needs a GPU and bfloat16/float16 inputs; raises UserError otherwise (there is no silent fallback,
    so a run or a benchmark never reports XLA attention as cuDNN).
    """
    if jax.default_backend() != "gpu":
        raise UserError(
            f"model.attention=cudnn needs an NVIDIA GPU (cuDNN flash attention) but JAX runs on "
            f"{jax.default_backend()!r} here; use model.attention=xla"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"model.attention=cudnn needs model.compute_dtype bfloat16 or float16, got {q.dtype}; "
            "set model.compute_dtype=bfloat16 or use model.attention=xla"
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _dropout_fn(rng, rate: float):
    if rng is None or rate == 0.0:
        return None

    def drop(x):
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    return drop


def block(
    cfg: DecoderConfig, p: Params, h: jax.Array, ctx: dict, lora: Params | None, lora_scale, rng, cache
):
    """One transformer layer. h: [B, T, D] float32 residual stream. Returns (h, new_cache).

    Training (no cache, `remat="none"`) keeps the matmul outputs for the backward pass and recomputes
    only the cheap rest: the norms, RoPE, activations and the rank-r LoRA products `x @ A`. Saving
    every float32 intermediate instead costs more memory traffic than recomputing it.
    """
    dt = jnp.dtype(cfg.compute_dtype)
    rngs = jax.random.split(rng, 8) if rng is not None else [None] * 8

    def lin(p, lo, group, name, x, i):
        sub = lo.get(group, {}).get(name)
        drop = _dropout_fn(rngs[i], ctx["lora_dropout"]) if sub is not None else None
        return linear(p[group][name], x, dt, sub, lora_scale, drop)

    def project_qkv(p, lo, h):  # [B, T, D] -> q [B, T, N, H], k/v [B, T, K, H]
        b, t, _ = h.shape
        x = norm(p["attn_norm"], h, cfg)
        if cfg.fused_qkv:
            qkv = lin(p, lo, "attn", "c_attn", x, 0)
            q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
        else:
            q = lin(p, lo, "attn", "q_proj", x, 0)
            k, v = lin(p, lo, "attn", "k_proj", x, 1), lin(p, lo, "attn", "v_proj", x, 2)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = norm(p["attn"]["q_norm"], q, cfg).astype(dt)
            k = norm(p["attn"]["k_norm"], k, cfg).astype(dt)
        if not cfg.learned_positions:
            q = apply_rope(q, ctx["positions"], ctx["inv_freq"])
            k = apply_rope(k, ctx["positions"], ctx["inv_freq"])
        return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")

    def finish(p, lo, h, attn):  # residual stream [B, T, D] and attention output [B, T, N * H]
        out = lin(p, lo, "attn", "c_proj" if cfg.fused_qkv else "o_proj", attn, 3)
        h = checkpoint_name(h + out.astype(F32), "mlp_input")
        x = norm(p["mlp_norm"], h, cfg)
        if cfg.activation == "silu":
            gate = checkpoint_name(lin(p, lo, "mlp", "gate_proj", x, 4), "mlp_gate")
            up = checkpoint_name(lin(p, lo, "mlp", "up_proj", x, 5), "mlp_up")
            mid = (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(dt)
            out = lin(p, lo, "mlp", "down_proj", mid, 6)
        else:
            up = checkpoint_name(lin(p, lo, "mlp", "c_fc", x, 4), "mlp_up")
            mid = jax.nn.gelu(up.astype(F32), approximate=True).astype(dt)
            out = lin(p, lo, "mlp", "c_proj", mid, 6)
        return h + out.astype(F32)

    lo = lora or {}
    training = cache is None
    if training and cfg.remat == "none":
        project_qkv = jax.checkpoint(project_qkv, policy=jax.checkpoint_policies.nothing_saveable)
        keep = jax.checkpoint_policies.save_only_these_names("mlp_input", "mlp_gate", "mlp_up")
        finish = jax.checkpoint(finish, policy=keep)
    b, t, _ = h.shape
    q, k, v = project_qkv(p, lo, h)
    if training:
        new_cache = None
        if cfg.attention == "cudnn":
            mask = attention_mask(
                ctx["positions"], ctx["segment_ids"], ctx["positions"], ctx["segment_ids"], ctx["window"]
            )
            out = cudnn_attention(q, k, v, mask)
        else:
            block_size = attention_block_size(t)
            out = causal_attention(q, k, v, ctx["positions"], ctx["segment_ids"], ctx["window"], block_size)
    else:
        idx = ctx["cache_index"]
        ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
        new_cache = {"k": ck, "v": cv}
        mask = attention_mask(
            ctx["positions"], ctx["segment_ids"], ctx["cache_positions"], ctx["cache_segments"], ctx["window"]
        )
        out = dot_attention(q, ck.astype(dt), cv.astype(dt), mask, cfg)
    h = finish(p, lo, h, out.reshape(b, t, cfg.q_dim))
    return checkpoint_name(h, "residual"), new_cache


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def default_positions(input_ids: jax.Array) -> jax.Array:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def embed(params: Params, cfg: DecoderConfig, input_ids, positions) -> jax.Array:
    """Token (and GPT-2 position) embeddings as the float32 residual stream [B, T, D]."""
    h = jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(jnp.float32)
    if cfg.learned_positions:
        h = h + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(jnp.float32)
    return h


def lm_head_kernel(params: Params, cfg: DecoderConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    dt = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].astype(dt).T
    return as_kernel(params["lm_head"]["kernel"], dt)


def logits_from_hidden(params: Params, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> float32 logits [..., V]."""
    dt = jnp.dtype(cfg.compute_dtype)
    w = lm_head_kernel(params, cfg)
    return jnp.einsum("...d,dv->...v", hidden.astype(dt), w, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    cfg: DecoderConfig,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    lora: Params | None = None,
    lora_scale: float | jax.Array = 1.0,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    cache: dict | None = None,
    return_hidden: bool = False,
):
    """Run the decoder.

    input_ids, positions, segment_ids: [B, T] int32 (segment 0 = padding; packed rows use 1, 2, ...).
    lora: the trainable tree for the `layers` (see module doc); `lora_scale` is a scalar or a per-layer
    [L] array (0 for layers not transformed). cache: from `jaxlora.models.generate.init_cache`, with
    `index`, `positions`, `segments` already holding this step's entries.
    Returns float32 logits [B, T, V] (or the final-normed hidden [B, T, D] with `return_hidden`), and
    the updated cache when one was given.
    """
    if positions is None:
        positions = default_positions(input_ids)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    ctx = {
        "positions": positions,
        "segment_ids": segment_ids,
        "inv_freq": rope_inv_freq(cfg),
        "lora_dropout": lora_dropout,
    }
    if cache is not None:
        ctx.update(
            cache_index=cache["index"], cache_positions=cache["positions"], cache_segments=cache["segments"]
        )
    h = embed(params, cfg, input_ids, positions)

    scale = jnp.broadcast_to(jnp.asarray(lora_scale, jnp.float32), (cfg.num_layers,))
    rngs = jax.random.split(dropout_rng, cfg.num_layers) if dropout_rng is not None else None
    xs = {
        "p": params["layers"],
        "lora": lora,
        "scale": scale,
        "window": jnp.asarray(cfg.sliding_windows, jnp.int32),
        "rng": rngs,
        "cache": None if cache is None else {"k": cache["k"], "v": cache["v"]},
    }

    def body(h, x):
        layer_ctx = dict(ctx, window=x["window"])
        h, new_cache = block(cfg, x["p"], h, layer_ctx, x["lora"], x["scale"], x["rng"], x["cache"])
        return h, new_cache

    layer = _remat(body, cfg.remat)
    if cfg.scan_layers:
        h, new_kv = jax.lax.scan(layer, h, xs)
    else:  # one copy of the layer per layer in the program: static slices, no stacked residuals
        kvs = []
        for i in range(cfg.num_layers):
            h, kv = layer(h, jax.tree.map(lambda a, i=i: a[i], xs))
            kvs.append(kv)
        new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
    h = norm(params["final_norm"], h, cfg)
    out = h if return_hidden else logits_from_hidden(params, cfg, h)
    if cache is None:
        return out
    return out, dict(cache, k=new_kv["k"], v=new_kv["v"])
