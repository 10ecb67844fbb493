"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE, gpt-oss): a softmax top-k router and dropless
SwiGLU experts. (Qwen2-MoE's shared expert is an ordinary gated MLP, computed beside this one by the decoder.)

    params["layers"]["moe"] = {"router": {"kernel": [L, D, E], "bias"?: [L, E]},
                               "gate_up_proj": {"kernel": [L, E, D, 2F], "bias"?: [L, E, 2F]},
                               "down_proj": {"kernel": [L, E, F, D], "bias"?: [L, E, D]}}

gate_up_proj holds the gate columns first, then up; gpt-oss (`cfg.swiglu_alpha` > 0) interleaves them (gate
= [..., ::2], up = [..., 1::2]), has the biases, and clamps its SwiGLU (`expert_activation`).
    lora["moe"] (optional) = {"router": {"a": [L, D, r], "b": [L, r, E]},
                              "gate_up_proj" | "down_proj": {"a": [L, E, in, r], "b": [L, E, r, out]}}

Each token goes to its top-k experts by router softmax (weights renormalized to sum 1 when
`norm_topk_prob`, as transformers; gpt-oss's softmax over the top-k logits is that renormalization),
and every routed token is computed: no capacity, no dropped tokens, so the output equals transformers'.
Two ways to compute the experts, same result:

  ragged  the N*k (token, expert) pairs sorted by expert, one grouped matmul per projection
          (`jax.lax.ragged_dot`, group sizes = tokens per expert); work grows with k, not E.
  dense   every expert on every token (einsum over [E, ...]), the unrouted results weighted 0; E/k times
          the work, but plain matmuls: faster for a few tiny experts on CPU.

Written by hand because no JAX library we depend on has a dropless top-k MoE with per-expert LoRA. Expert
LoRA is PEFT's `target_parameters` adapter: a rank-r pair per expert, added to that expert's weight.
Shapes: N tokens (B*T), E experts, k experts per token, F expert width, D hidden.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.config import DecoderConfig
from jaxlora.quant import as_kernel

F32 = jnp.float32


def use_ragged(cfg: DecoderConfig) -> bool:
    """`runtime.moe_impl`; "auto" = dense on the CPU (XLA:CPU lowers ragged_dot to a slow loop: 2.6x slower
    than dense for 64 experts, top-4, measured) and for at most 8 experts of width <= 256, else ragged."""
    if cfg.runtime.moe_impl != "auto":
        return cfg.runtime.moe_impl == "ragged"
    if cfg.runtime.target_backend == "cpu":
        return False
    return cfg.num_experts > 8 or cfg.moe_intermediate_size > 256


def route(cfg: DecoderConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [N, E] -> (probs [N, E] float32, top-k weights [N, k], expert ids [N, k] int32)."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def router_stats(cfg: DecoderConfig, probs: jax.Array, experts: jax.Array, mask: jax.Array) -> jax.Array:
    """[2, E] float32: routed (token, expert) pairs per expert and summed router probabilities per expert,
    over the real tokens (`mask` [N] 0/1): the terms of HF's load-balancing loss (`aux_loss`)."""
    counts = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * mask[:, None, None], axis=(0, 1))
    return jnp.stack([counts, jnp.sum(probs * mask[:, None], axis=0)])


def aux_loss(cfg: DecoderConfig, stats: jax.Array, mask: jax.Array) -> jax.Array:
    """HF's `load_balancing_loss_func` from the per-layer `router_stats` [L, 2, E] and the token mask:
    E * sum_e (routed share of e) * (mean probability of e), both averaged over layers and real tokens."""
    rows = stats.shape[0] * jnp.sum(mask.astype(F32))
    per_expert = jnp.sum(stats, axis=0) / rows  # [2, E]
    return cfg.num_experts * jnp.sum(per_expert[0] * per_expert[1])


def expert_activation(cfg: DecoderConfig, gu: jax.Array) -> jax.Array:
    """gate_up outputs [..., 2F] float32 -> [..., F] float32: silu(gate) * up, or gpt-oss's clamped SwiGLU
    on interleaved columns, (clip(up, -l, l) + 1) * g * sigmoid(alpha * g) with g = min(gate, l)."""
    if not cfg.swiglu_alpha:
        f = gu.shape[-1] // 2
        gate = gu[..., :f]
        act = jax.nn.gelu(gate, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(gate)
        return act * gu[..., f:]  # Gemma 4's experts: GeGLU
    limit = cfg.swiglu_limit
    gate = jnp.minimum(gu[..., ::2], limit)
    up = jnp.clip(gu[..., 1::2], -limit, limit)
    return (up + 1.0) * gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha)


def _bias(p: dict, rows: jax.Array | None = None):
    """A projection's expert biases [E, out] float32, taken at expert ids `rows` ([M] -> [M, out]), or
    broadcastable over [E, N, out] when `rows` is None; 0 where the experts have none."""
    if "bias" not in p:
        return 0.0
    b = p["bias"].astype(F32)
    return b[:, None, :] if rows is None else jnp.take(b, rows, axis=0)


def _scale(lora: dict, scale):
    """The layer's LoRA scale times the adapter's own factor "s" (rank/alpha patterns), if it has one."""
    return scale * jax.lax.stop_gradient(lora["s"]) if "s" in lora else scale


def _expert_ragged(x, w, lora, scale, sizes, dt):
    """x [M, in] sorted by expert, w [E, in, out], group sizes [E] -> [M, out] float32 (plus LoRA)."""
    y = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=F32)
    if lora is not None:
        scale = _scale(lora, scale)
        xa = jax.lax.ragged_dot(x.astype(F32), lora["a"], sizes, preferred_element_type=F32)  # [M, r]
        y = y + scale * jax.lax.ragged_dot(xa, lora["b"], sizes, preferred_element_type=F32)
    return y


def _expert_dense(x, w, lora, scale, dt):
    """x [E, N, in] (or [N, in], shared), w [E, in, out] -> [E, N, out] float32 (plus LoRA)."""
    spec = "end,edf->enf" if x.ndim == 3 else "nd,edf->enf"
    y = jnp.einsum(spec, x, w, preferred_element_type=F32)
    if lora is not None:
        scale = _scale(lora, scale)
        xa = jnp.einsum(spec.replace("f", "r"), x.astype(F32), lora["a"])  # [E, N, r]
        y = y + scale * jnp.einsum("enr,erf->enf", xa, lora["b"])
    return y


def moe_mlp(
    cfg: DecoderConfig, p: dict, lora: dict | None, m: jax.Array, scale, mask: jax.Array, linear, routed=None
):
    """The MoE MLP on the normed stream m [B, T, D] (float32). `scale` is the layer's LoRA scale; `mask`
    [B, T] marks real tokens (for the router statistics); `linear(p, x, lora)` is the decoder's linear layer
    (the router goes through it, so router LoRA behaves like any adapted linear). `routed` [B, T, D]: the
    router's input where it is not m (Gemma 4); with `p["expert_scale"]` ([E]) each top-k weight is times
    its expert's scale.

    Returns (out [B, T, D] in the compute dtype, router_stats [2, E])."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    b, t, d = m.shape
    lora = lora or {}
    x = m.reshape(b * t, d).astype(dt)  # [N, D]
    r_in = x if routed is None else routed.reshape(b * t, d).astype(dt)
    logits = linear(p["router"], r_in, lora=lora.get("router"))  # [N, E]
    probs, weights, experts = route(cfg, logits)
    if "expert_scale" in p:
        weights = weights * jnp.take(p["expert_scale"]["scale"].astype(F32), experts)
    stats = router_stats(cfg, probs, experts, mask.reshape(-1).astype(F32))
    w_gu = as_kernel(p["gate_up_proj"]["kernel"], dt)  # [E, D, 2F]
    w_down = as_kernel(p["down_proj"]["kernel"], dt)  # [E, F, D]
    lo_gu, lo_down = lora.get("gate_up_proj"), lora.get("down_proj")
    k = cfg.experts_per_token
    p_gu, p_down = p["gate_up_proj"], p["down_proj"]
    if use_ragged(cfg):
        flat = experts.reshape(-1)  # [N*k]
        order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
        sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)  # [E]
        ids = jnp.take(flat, order)  # [N*k]: each sorted pair's expert
        xs = jnp.take(x, order // k, axis=0)  # [N*k, D]
        gu = _expert_ragged(xs, w_gu, lo_gu, scale, sizes, dt) + _bias(p_gu, ids)
        act = expert_activation(cfg, checkpoint_name(gu, "mlp_up")).astype(dt)  # [N*k, F]
        y = _expert_ragged(act, w_down, lo_down, scale, sizes, dt) + _bias(p_down, ids)  # [N*k, D]
        y = y * jnp.take(weights.reshape(-1), order)[:, None]
        out = jnp.zeros((b * t, d), F32).at[order // k].add(y)  # each token's k results summed
    else:
        gu = _expert_dense(x, w_gu, lo_gu, scale, dt) + _bias(p_gu)  # [E, N, 2F]
        act = expert_activation(cfg, checkpoint_name(gu, "mlp_up")).astype(dt)  # [E, N, F]
        y = _expert_dense(act, w_down, lo_down, scale, dt) + _bias(p_down)  # [E, N, D]
        gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts, dtype=F32) * weights[..., None], axis=1)
        out = jnp.einsum("end,ne->nd", y, gates)  # [N, D]
    return out.reshape(b, t, d).astype(dt), stats
