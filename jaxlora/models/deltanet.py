"""Qwen3.5's Gated DeltaNet (linear attention) layer as pure functions: transformers' `Qwen3_5GatedDeltaNet`.

One layer's weights, with HF's names under `linear_attn` (Qwen3.5 dense and MoE are the same layer):

    p = {
      "in_proj_qkv": {"kernel": [D, C]},  C = 2 * Hk * Dk + Hv * Dv: [q; k; v], the conv's channels
      "in_proj_z": {"kernel": [D, Hv * Dv]},  "in_proj_b", "in_proj_a": {"kernel": [D, Hv]},
      "out_proj": {"kernel": [Hv * Dv, D]},
      "conv1d": {"kernel": [W, C]},   HF's depthwise `conv1d.weight` [C, 1, W] transposed; no bias
      "A_log": [Hv], "dt_bias": [Hv],
      "norm": {"scale": [Dv]},        the gated RMSNorm's plain weight (init 1, no 1 + w offset)
    }

The layer: q, k, v = silu(causal depthwise conv(in_proj_qkv(x))); z = in_proj_z(x);
beta = sigmoid(in_proj_b(x)); g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias) (the log decay, <= 0).
q and k are l2-normalised, q scaled by Dk^-1/2, and each of the Hk key heads serves Hv / Hk consecutive
value heads. The gated delta rule runs on a state S [Dk, Dv] per value head:

    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t

Then o = RMSNorm(o) * scale * silu(z) per head, and out_proj.

Shapes: B batch, T tokens, D hidden, Hk / Hv key / value heads, Dk / Dv their head dims, W conv width, C conv
channels, L chunk length, n chunks. The rule, the conv and the norms run in float32.

Padding and packing (`segment_ids` [B, T], 0 = padding, packed rows 1, 2, ...; each id one contiguous run):
padded positions are zeroed before the projections, as transformers' attention mask does, and a new segment
starts from an empty state: the conv reads no input of another segment, and the recurrent state is reset.
So a packed row equals its segments run one by one, and left or right padding equals transformers' masked
forward at every position.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.quant import qmatmul

F32 = jnp.float32


class DeltaNetDims(NamedTuple):
    """The layer's sizes, from HF's `config.json` (`from_hf`)."""

    num_k_heads: int  # Hk, linear_num_key_heads
    num_v_heads: int  # Hv, linear_num_value_heads
    head_k_dim: int  # Dk, linear_key_head_dim
    head_v_dim: int  # Dv, linear_value_head_dim
    conv_kernel: int = 4  # W, linear_conv_kernel_dim
    eps: float = 1e-6  # the gated RMSNorm's epsilon (rms_norm_eps)
    chunk: int = 64  # L, the chunk length of the scan (not a model fact: any value gives the same result)

    @classmethod
    def from_hf(cls, config: dict, chunk: int = 64) -> "DeltaNetDims":
        if config.get("hidden_act", "silu") != "silu":
            act = config["hidden_act"]
            raise UserError(f"config.json: hidden_act {act!r}: Gated DeltaNet layers support silu only")
        return cls(
            config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_key_head_dim"],
            config["linear_value_head_dim"], config.get("linear_conv_kernel_dim", 4),
            config.get("rms_norm_eps", 1e-6), chunk,
        )  # fmt: skip

    @property
    def conv_dim(self) -> int:
        """C: the conv's channels, [q; k; v]."""
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim


class DeltaNetState(NamedTuple):
    """One layer's generation cache."""

    conv: jax.Array  # [B, W - 1, C]: the last W - 1 conv inputs, in the stream's (compute) dtype
    recurrent: jax.Array  # [B, Hv, Dk, Dv] float32


def init_state(dims: DeltaNetDims, batch: int, dtype=F32) -> DeltaNetState:
    """The empty cache of one layer (zero conv inputs in `dtype`, the compute dtype; zero state)."""
    conv = jnp.zeros((batch, dims.conv_kernel - 1, dims.conv_dim), dtype)
    return DeltaNetState(conv, jnp.zeros((batch, dims.num_v_heads, dims.head_k_dim, dims.head_v_dim), F32))


# --- the gated delta rule -----------------------------------------------------------------------------------


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis (FLA's and transformers' form)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta, use_qk_l2norm: bool):
    """float32; q and k repeated from Hk to Hv heads (each key head serves Hv / Hk consecutive value heads),
    l2-normalised when asked, and q scaled by Dk^-1/2. Head axis -2 of q, k, v; the last of g, beta."""
    rep = v.shape[-2] // k.shape[-2]
    q, k = q.astype(F32), k.astype(F32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = jnp.repeat(q, rep, axis=-2), jnp.repeat(k, rep, axis=-2)
    return q * k.shape[-1] ** -0.5, k, v.astype(F32), g.astype(F32), beta.astype(F32)


def _within_chunks(q, k, v, g, beta, seg, prev_seg):
    """Everything that does not need the state, for all chunks at once.

    q, k: [n, B, Hv, L, Dk]; v: [n, B, Hv, L, Dv]; g, beta: [n, B, Hv, L]; seg: [n, B, L]; prev_seg: [n, B],
    the segment of the token before each chunk (whose state the chunk receives). The L delta updates of a
    chunk are one unit-lower-triangular solve (the UT transform: u = A^-1 beta v, w = A^-1 beta exp(cum g) k,
    A = I + strictly-lower(beta k k^T * decay)); pairs and state reads across a segment start are masked.
    Returns (u [.., L, Dv], w [.., L, Dk], q decayed from the chunk's start [.., L, Dk], attn [.., L, L],
    k decayed to the chunk's end [.., L, Dk], the state's decay over the chunk [n, B, Hv]).
    """
    length, dv = g.shape[-1], v.shape[-1]
    cum = jnp.cumsum(g, axis=-1)  # [n, B, Hv, L] log decay from the chunk's start
    causal = jnp.tril(jnp.ones((length, length), bool))
    same = (seg[..., :, None] == seg[..., None, :]) & causal  # [n, B, L, L]
    diff = cum[..., :, None] - cum[..., None, :]  # [n, B, Hv, L, L]: log decay from j to i
    decay = jnp.exp(jnp.where(same[:, :, None], diff, -jnp.inf))  # 0 above the diagonal and across segments
    carried = (seg == prev_seg[..., None])[:, :, None, :, None].astype(F32)  # [n, B, 1, L, 1]: reads S
    kb = k * beta[..., None]
    lower = jnp.tril(jnp.einsum("...ik,...jk->...ij", kb, k) * decay, -1)  # [n, B, Hv, L, L]
    rhs = jnp.concatenate([v * beta[..., None], kb * jnp.exp(cum)[..., None] * carried], axis=-1)
    sol = jax.lax.linalg.triangular_solve(lower, rhs, left_side=True, lower=True, unit_diagonal=True)
    attn = jnp.einsum("...ik,...jk->...ij", q, k) * decay  # [n, B, Hv, L, L]
    keep = (seg == seg[..., -1:])[:, :, None, :, None].astype(F32)  # [n, B, 1, L, 1]: in the last segment
    k_end = k * jnp.exp(cum[..., -1:] - cum)[..., None] * keep
    q_start = q * jnp.exp(cum)[..., None] * carried
    return sol[..., :dv], sol[..., dv:], q_start, attn, k_end, jnp.exp(cum[..., -1]) * carried[..., -1, 0]


def _across_chunks(state, xs):
    """One chunk's step of the scan: state [B, Hv, Dk, Dv] and one chunk of `_within_chunks`' outputs ->
    (the state after the chunk, o [B, Hv, L, Dv])."""
    u, w, q_start, attn, k_end, state_decay = xs
    v_new = u - jnp.einsum("bhlk,bhkv->bhlv", w, state)  # what the state does not predict yet
    o = jnp.einsum("bhlk,bhkv->bhlv", q_start, state) + jnp.einsum("bhij,bhjv->bhiv", attn, v_new)
    state = state * state_decay[..., None, None] + jnp.einsum("bhlk,bhlv->bhkv", k_end, v_new)
    return state, o


def _one_chunk(state, xs):
    """`_within_chunks` then `_across_chunks` on one chunk (xs without the leading [n] axis)."""
    within = _within_chunks(*(x[None] for x in xs))
    return _across_chunks(state, [x[0] for x in within])


def chunk_gated_delta_rule(
    q, k, v, g, beta, chunk: int = 64, initial_state=None, segment_ids=None, use_qk_l2norm: bool = False,
    remat_chunks: bool = True,
):  # fmt: skip
    """The gated delta rule over a sequence, as a `lax.scan` over chunks of L = min(chunk, T) tokens.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g (log decay, <= 0), beta: [B, T, Hv]; initial_state:
    [B, Hv, Dk, Dv] or None (zeros); segment_ids: [B, T] or None (one segment): the state is reset where the
    id changes (see the module doc). Returns (o [B, T, Hv, Dv] in q's dtype, final state [B, Hv, Dk, Dv]
    float32). Memory is O(T), no [T, T] array. `remat_chunks` (default): each chunk's work runs in the scan
    and is rematerialized by the backward pass, which keeps the state before each chunk [n, B, Hv, Dk, Dv]
    and one chunk's temporaries. False: the work within chunks runs for all chunks at once and only the
    state's recurrence is scanned: about 1.5x faster on CPU, twice the backward's memory (the [n, B, Hv, L, L]
    decays of every chunk; 3.4 against 1.8 GiB at T = 8192, Hv = 32, D = 128).
    Equals transformers' `torch_chunk_gated_delta_rule` (with `use_qk_l2norm_in_kernel`=`use_qk_l2norm`).
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)  # [B, T, Hv, *] float32
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    length = min(chunk, t)
    n = -(-t // length)
    pad = n * length - t
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")  # the tail continues the last segment, g = k = 0

    def chunks(x):  # [B, T, Hv, ...] -> [n, B, Hv, L, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(b, n, length, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    seg = jnp.moveaxis(seg.reshape(b, n, length), 1, 0)  # [n, B, L]
    prev_seg = jnp.concatenate([seg[:1, :, 0], seg[:-1, :, -1]])  # [n, B]; the initial state: the first's
    xs = (*map(chunks, (q, k, v, g, beta)), seg, prev_seg)
    state = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    if remat_chunks:
        state, o = jax.lax.scan(jax.checkpoint(_one_chunk), state, xs)  # o: [n, B, Hv, L, Dv]
    else:
        state, o = jax.lax.scan(_across_chunks, state, _within_chunks(*xs))
    o = jnp.moveaxis(o, 0, 1).swapaxes(2, 3).reshape(b, n * length, h, dv)[:, :t]
    return o.astype(out_dtype), state


def recurrent_step(q, k, v, g, beta, state, use_qk_l2norm: bool = False):
    """One token of the rule (generation), as transformers' `torch_recurrent_gated_delta_rule` per step.

    q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dk, Dv].
    Returns (o [B, Hv, Dv] in q's dtype, the new state [B, Hv, Dk, Dv] float32).
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    state = state.astype(F32) * jnp.exp(g)[..., None, None]
    delta = (v - jnp.einsum("bhkv,bhk->bhv", state, k)) * beta[..., None]  # [B, Hv, Dv]
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q).astype(out_dtype), state


# --- the conv, the norm and the layer -----------------------------------------------------------------------


def causal_conv1d(x, weight, bias=None, state=None, segment_ids=None):
    """Causal depthwise conv: y_t = sum_j weight[j] * x_{t - (W - 1) + j} (+ bias), before the activation.

    x: [B, T, C]; weight: [W, C]; bias: [C] or None; state: [B, W - 1, C], the inputs before x (None: zeros);
    segment_ids: [B, T] or None: an output reads no input of another segment (the state counts as the first
    token's). Returns (y [B, T, C] float32, the new state: the last W - 1 inputs [B, W - 1, C]).
    """
    b, t, c = x.shape
    w = weight.shape[0]
    prev = jnp.zeros((b, w - 1, c), x.dtype) if state is None else state.astype(x.dtype)
    xp = jnp.concatenate([prev, x], axis=1)  # [B, W - 1 + T, C]
    y = jnp.zeros((b, t, c), F32) if bias is None else jnp.broadcast_to(bias.astype(F32), (b, t, c))
    if segment_ids is not None:
        segp = jnp.concatenate([jnp.repeat(segment_ids[:, :1], w - 1, axis=1), segment_ids], axis=1)
    for j in range(w):
        tap = xp[:, j : j + t].astype(F32) * weight[j].astype(F32)  # [B, T, C]
        if segment_ids is not None:
            tap = tap * (segp[:, j : j + t] == segment_ids)[..., None]
        y = y + tap
    return y, xp[:, t:]


def gated_rmsnorm(x, gate, scale, eps: float = 1e-6):
    """RMSNorm(x) * scale * silu(gate) over the last axis (`Qwen3_5RMSNormGated`: norm before the gate; the
    scale is used as is). x, gate: [..., Dv]; scale: [Dv]. Returns float32."""
    x = x.astype(F32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * scale.astype(F32) * jax.nn.silu(gate.astype(F32))


def gated_deltanet(p, x, dims: DeltaNetDims, proj=None, segment_ids=None, state: DeltaNetState | None = None):
    """The whole Gated DeltaNet layer on the normed stream x [B, T, D] (the compute dtype).

    proj(name, inp): runs the linear `p[name]` on inp (the decoder passes one with the module's LoRA adapter;
    None: the plain kernel). segment_ids [B, T] (0 = padding) or None: see the module doc. state: the cache
    from before these tokens (None: empty); one token with a state takes the recurrent step.
    Returns ([B, T, D] in x's dtype, the state after the last token: `DeltaNetState`).
    """
    dt = x.dtype
    b, t, _ = x.shape
    hk, hv, dk, dv = dims.num_k_heads, dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
    if proj is None:
        proj = lambda name, inp: qmatmul(inp, p[name]["kernel"], dt)  # noqa: E731
    if segment_ids is not None:  # padding contributes nothing, as transformers' mask
        x = x * (segment_ids > 0)[..., None].astype(dt)
    prev = None if state is None else state.conv
    qkv = proj("in_proj_qkv", x)  # [B, T, C]
    conv, conv_state = causal_conv1d(qkv, p["conv1d"]["kernel"], None, prev, segment_ids)
    q, k, v = jnp.split(jax.nn.silu(conv), [hk * dk, 2 * hk * dk], axis=-1)
    q, k, v = q.reshape(b, t, hk, dk), k.reshape(b, t, hk, dk), v.reshape(b, t, hv, dv)
    beta = jax.nn.sigmoid(proj("in_proj_b", x).astype(F32))  # [B, T, Hv]
    a = proj("in_proj_a", x).astype(F32) + p["dt_bias"].astype(F32)
    g = -jnp.exp(p["A_log"].astype(F32)) * jax.nn.softplus(a)  # [B, T, Hv]
    if state is not None and t == 1:
        o, rec = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.recurrent, True)
        o = o[:, None]
    else:
        initial = None if state is None else state.recurrent
        o, rec = chunk_gated_delta_rule(q, k, v, g, beta, dims.chunk, initial, segment_ids, True)
    z = proj("in_proj_z", x).reshape(b, t, hv, dv)
    o = gated_rmsnorm(o, z, p["norm"]["scale"], dims.eps)  # [B, T, Hv, Dv]
    return proj("out_proj", o.reshape(b, t, hv * dv).astype(dt)), DeltaNetState(conv_state, rec)
