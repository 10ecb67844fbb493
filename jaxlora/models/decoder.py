"""One decoder-only transformer for every supported family (`models.families.FAMILIES`), as pure functions.

Parameters are a nested dict (a pytree) with HF's module names for every linear layer, so LoRA targets,
loading and PEFT export all use one vocabulary. Layer parameters are stacked on a leading axis `L` and
run with `jax.lax.scan`, so compile time does not grow with depth (`cfg.runtime.scan_layers=False` unrolls).

    params = {
      "embed": {"embedding": [V, D]},          "pos_embed": {"embedding": [P, D]}   (GPT-2)
      "layers": {
        "attn_norm"?, "mlp_norm"?: {"scale": [L, D], "bias"?},   (pre-norms; absent in OLMo 2)
        "attn_post_norm"?, "mlp_post_norm"?: {"scale": [L, D]},  (Gemma 2/3, OLMo 2)
        "attn": {"q_proj" | "k_proj" | "v_proj" | "o_proj" | "c_attn" | "c_proj" | "qkv_proj":
                     {"kernel": [L, in, out], "bias"?},
                 "q_norm"?, "k_norm"?: {"scale": [L, H]} ([L, N*H], [L, K*H] in OLMo 2),
                 "sinks"?: {"logit": [L, N]} (gpt-oss)},
        "mlp": {"gate_proj" | "up_proj" | "down_proj" | "c_fc" | "c_proj" | "gate_up_proj":
                     {"kernel": [L, in, out], "bias"?}},
        "moe"?: {"router": {"kernel": [L, D, E], "bias"?},
                 "gate_up_proj" | "down_proj": {"kernel": [L, E, in, out], "bias"?: [L, E, out]}}
                 (Mixtral, Qwen3-MoE, Qwen2-MoE, gpt-oss: instead of "mlp"; see `jaxlora.models.moe`),
        "shared_expert"?: {"gate_proj" | "up_proj" | "down_proj": {"kernel": [L, in, out]},
                           "router": {"kernel": [L, D, 1]}}   (Qwen2-MoE; "router" = shared_expert_gate)
      },
      "final_norm": {"scale": [D], "bias"?},  "lm_head": {"kernel": [D, V]}  (absent when tied)
    }

A linear `kernel` may also be a `jaxlora.quant.QuantizedTensor`; `lora` mirrors the targeted linear
layers with `{"a": [L, in, r], "b": [L, r, out]}` and is added as `base(x) + scale * B(A(dropout(x)))`.
Norms, softmax and logits run in float32; matmuls in `cfg.runtime.compute_dtype`. The linear layer, norms
and dropout live in `jaxlora.models.layer_ops`; attention in
`jaxlora.models.attention`. Shapes: B batch, T tokens, D hidden, N/K query/key-value heads, H head dim,
F MLP width, r LoRA rank.
"""

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models import hybrid_cache
from jaxlora.models.attention import KVCache, attend
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.embed_logits import cap_logits as cap_logits  # re-exported
from jaxlora.models.embed_logits import default_positions, embed, logits_from_hidden
from jaxlora.models.embed_logits import lm_head_kernel as lm_head_kernel  # re-exported
from jaxlora.models.gemma4_layers import (
    gemma4_attention,
    gemma4_experts,
    per_layer_inputs,
    ple_residual,
    run_gemma4,
)
from jaxlora.models.hybrid_layers import linear_attention, run_hybrid
from jaxlora.models.layer_ops import linear, norm
from jaxlora.models.lora_product import lora_product_for
from jaxlora.models.moe import aux_loss as moe_aux_loss
from jaxlora.models.moe import moe_mlp
from jaxlora.models.remat import LAYER_INPUT, MLP_TILE, REMAT, TILED_REMATS, after_cotangent
from jaxlora.models.rope import apply_rope, layer_inv_freq
from jaxlora.models.spec import dropout_stream

Params = dict[str, Any]
F32 = jnp.float32


class LayerInputs(NamedTuple):
    """What one layer reads besides its weights, its adapters and the residual stream."""

    positions: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32, 0 = padding, packed rows 1, 2, ...
    inv_freq: jax.Array  # [R/2] float32: this layer's RoPE inverse frequencies (zeros: no RoPE)
    window: jax.Array  # int32 scalar: this layer's sliding window, 0 = full attention
    lora_scale: jax.Array  # float32 scalar: alpha/r for this layer, 0 where it is not adapted
    dropout_rng: jax.Array | None = None  # this layer's LoRA dropout key; None = no dropout
    cache: KVCache | None = None  # this layer's slice of the KV cache (generation; Qwen3.5: a `HybridCache`)
    ple: jax.Array | None = None  # Gemma 4: this layer's per-layer input [B, T, P]
    shared_kv: tuple | None = None  # Gemma 4's KV-shared layers: the (k, v) they attend with


# --- the projections of a layer ------------------------------------------------------------------------


def _project(cfg: DecoderConfig, p: Params, lora: Params, x: LayerInputs, rate: float, group, name, inp):
    """The layer's linear `p[group][name]` on `inp`, with its adapter and dropout when it has one (each
    adapted module draws its mask from its own key, fold_in(layer key, its stream in the family's spec))."""
    adapter = lora.get(group, {}).get(name)
    key = None
    if adapter is not None and x.dropout_rng is not None and rate > 0.0:
        key = jax.random.fold_in(x.dropout_rng, dropout_stream(cfg, group, name))
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    return linear(p[group][name], inp, dt, adapter, x.lora_scale, key, rate, lora_product_for(cfg))


# --- the layer and the model --------------------------------------------------------------------------------


def block(cfg: DecoderConfig, p: Params, lora: Params | None, h: jax.Array, x: LayerInputs, lora_dropout=0.0):
    """One transformer layer. h: [B, T, D] residual stream in the compute dtype; p, lora: this layer's.

    Returns (h in the compute dtype, (this layer's updated cache (k, v), a DeltaNet layer's `DeltaNetState`,
    or None; its router statistics [2, E] or None)).
    """
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    proj = partial(_project, cfg, p, lora or {}, x, lora_dropout)
    h = checkpoint_name(h, LAYER_INPUT).astype(F32)  # [B, T, D]: sums in float32 inside the layer
    # (pre-)norm -> attention -> (post-norm) -> residual
    a = norm(p["attn_norm"], h, cfg) if cfg.pre_norm else h  # [B, T, D]
    if "linear_attn" in p:  # Qwen3.5's Gated DeltaNet layers (jaxlora.models.hybrid_layers)
        out, new_kv = linear_attention(cfg, p, proj, a, x.segment_ids, x.cache)
    elif cfg.global_head_dim:  # Gemma 4 (jaxlora.models.gemma4_layers): new_kv = the (k, v) it used
        out, new_kv = gemma4_attention(cfg, p, proj, a, x)
    else:
        out, new_kv = attention(cfg, p, proj, a, x)
    if cfg.post_norm:
        out = norm(p["attn_post_norm"], out, cfg)
    h = checkpoint_name(h + out.astype(F32), "mlp_input")
    # (pre-)norm -> MLP or experts -> (post-norm) -> residual
    m = norm(p["mlp_norm"], h, cfg) if cfg.pre_norm else h  # [B, T, D]
    stats = None
    if cfg.num_experts and not cfg.global_head_dim:  # Mixtral, Qwen3-MoE, Qwen2-MoE, gpt-oss (models.moe)
        out, stats = experts(cfg, p, lora, proj, m, x)
    else:
        out = tiled_mlp(cfg, p, lora or {}, x, lora_dropout, m)
        if cfg.num_experts:  # Gemma 4: experts beside the MLP (jaxlora.models.gemma4_layers)
            out, stats = gemma4_experts(cfg, p, lora, out, h, x)
    if cfg.post_norm:
        out = norm(p["mlp_post_norm"], out, cfg)
    h = h + out.astype(F32)  # [B, T, D]
    if x.ple is not None:  # Gemma 4's per-layer input
        h = h + ple_residual(cfg, p, proj, h, x.ple)
    if "layer_scalar" in p:  # Gemma 4
        h = h * p["layer_scalar"]["scale"].astype(F32)
    return checkpoint_name(h.astype(dt), "residual"), (new_kv, stats)


def attention(cfg: DecoderConfig, p: Params, proj, a: jax.Array, x: LayerInputs):
    """q, k, v -> (q/k norm) -> RoPE -> attention -> out. a: the normed stream [B, T, D]; `proj` runs one
    of the layer's linears with its adapter. Returns ([B, T, D], this layer's updated cache or None)."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    b, t, _ = a.shape
    if cfg.fused_qkv:  # GPT-2's c_attn, Phi-3's qkv_proj: [q; k; v]
        qkv = proj("attn", "c_attn" if "c_attn" in p["attn"] else "qkv_proj", a)  # [B, T, (N + 2K) * H]
        q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
    else:
        q, k, v = proj("attn", "q_proj", a), proj("attn", "k_proj", a), proj("attn", "v_proj", a)
    if cfg.attn_output_gate:  # Qwen3.5: q_proj emits [query; gate] per head
        q, gate = jnp.split(q.reshape(b, t, cfg.num_heads, 2 * cfg.head_dim), 2, axis=-1)  # [B, T, N, H] each
    if cfg.qk_norm_full:  # OLMo 2: over the whole projection, before the split into heads
        q = norm(p["attn"]["q_norm"], q, cfg).astype(dt)
        k = norm(p["attn"]["k_norm"], k, cfg).astype(dt)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    if cfg.qk_norm:
        q = norm(p["attn"]["q_norm"], q, cfg).astype(dt)
        k = norm(p["attn"]["k_norm"], k, cfg).astype(dt)
    if not cfg.learned_positions:
        q = apply_rope(q, x.positions, x.inv_freq, cfg.rope_attention_factor)
        k = apply_rope(k, x.positions, x.inv_freq, cfg.rope_attention_factor)
    if cfg.attn_scale:  # every kernel divides the scores by sqrt(H): fold the wanted scale into q
        q = (q.astype(F32) * (cfg.attn_scale * math.sqrt(cfg.head_dim))).astype(q.dtype)
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
    sinks = p["attn"]["sinks"]["logit"] if cfg.attn_sinks else None  # [N]
    out, new_kv = attend(q, k, v, cfg, x.positions, x.segment_ids, x.window, x.cache, sinks)  # [B, T, N, H]
    if cfg.attn_output_gate:
        out = (out.astype(F32) * jax.nn.sigmoid(gate.astype(F32))).astype(dt)
    o_name = "c_proj" if "c_proj" in p["attn"] else "o_proj"
    return proj("attn", o_name, out.reshape(b, t, cfg.q_dim)), new_kv  # [B, T, D]


def mlp(cfg: DecoderConfig, p: Params, proj, m: jax.Array) -> jax.Array:
    """The dense MLP on the normed stream m [B, T, D]: gated act(gate) * up -> down, or GPT-2's
    c_fc -> GELU -> c_proj. Returns [B, T, D]."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    if cfg.activation not in ("silu", "gelu_tanh"):  # GPT-2
        up = checkpoint_name(proj("mlp", "c_fc", m), "mlp_up")  # [B, T, F]
        return proj("mlp", "c_proj", jax.nn.gelu(up.astype(F32), approximate=True).astype(dt))
    if cfg.fused_gate_up:  # Phi-3's gate_up_proj: [gate; up]
        gate, up = jnp.split(checkpoint_name(proj("mlp", "gate_up_proj", m), "mlp_up"), 2, axis=-1)
    else:
        gate = checkpoint_name(proj("mlp", "gate_proj", m), "mlp_gate")  # [B, T, F]
        up = checkpoint_name(proj("mlp", "up_proj", m), "mlp_up")  # [B, T, F]
    gate = gate.astype(F32)
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return proj("mlp", "down_proj", (act * up.astype(F32)).astype(dt))


def tiled_mlp(cfg: DecoderConfig, p: Params, lora: Params, x: LayerInputs, rate: float, m: jax.Array):
    """`mlp` on m [B, T, D], over tiles of at most MLP_TILE positions when training long rows under a
    policy that recomputes the MLP (TILED_REMATS): each tile is rematerialized, so the backward pass holds
    one tile's [B, tile, F] intermediates at a time instead of [B, T, F]. A tile's LoRA dropout key is the
    layer's folded with the tile's index. Returns [B, T, D]."""
    b, t, d = m.shape
    if x.cache is not None or cfg.runtime.remat not in TILED_REMATS or t <= MLP_TILE:
        return mlp(cfg, p, partial(_project, cfg, p, lora, x, rate), m)
    n = -(-t // MLP_TILE)
    size = -(-t // n)
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    tiles = jnp.pad(m.astype(dt), ((0, 0), (0, n * size - t), (0, 0))).reshape(b, n, size, d)

    def one(args):  # tile i: [B, size, D] -> [B, size, D]
        i, mi = args
        key = None if x.dropout_rng is None else jax.random.fold_in(x.dropout_rng, i)
        return mlp(cfg, p, partial(_project, cfg, p, lora, x._replace(dropout_rng=key), rate), mi)

    out = jax.lax.map(jax.checkpoint(one), (jnp.arange(n), tiles.swapaxes(0, 1)))  # [n, B, size, D]
    return out.swapaxes(0, 1).reshape(b, n * size, -1)[:, :t]


def experts(cfg: DecoderConfig, p: Params, lora: Params | None, proj, m: jax.Array, x: LayerInputs):
    """The routed experts on m [B, T, D] (and Qwen2-MoE's shared expert, added times
    sigmoid(shared_expert_gate(m))). Returns ([B, T, D], the router statistics [2, E])."""
    dt = jnp.dtype(cfg.runtime.compute_dtype)
    b, t, _ = m.shape
    router = partial(linear, dtype=dt, lora_scale=x.lora_scale, product=lora_product_for(cfg))
    moe_lora = (lora or {}).get("moe")
    real = x.segment_ids > 0 if x.cache is None else jnp.ones((b, t), bool)  # [B, T]
    out, stats = moe_mlp(cfg, p["moe"], moe_lora, m, x.lora_scale, real, router)
    if cfg.shared_expert_intermediate_size:
        gate = checkpoint_name(proj("shared_expert", "gate_proj", m), "mlp_gate")  # [B, T, FS]
        up = checkpoint_name(proj("shared_expert", "up_proj", m), "mlp_up")  # [B, T, FS]
        act = (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(dt)
        shared = proj("shared_expert", "down_proj", act).astype(F32)  # [B, T, D]
        weight = jax.nn.sigmoid(proj("shared_expert", "router", m).astype(F32))  # [B, T, 1]
        out = (out.astype(F32) + weight * shared).astype(dt)
    return out, stats


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
    cache: KVCache | None = None,
    return_hidden: bool = False,
    return_aux_loss: bool = False,
):
    """Run the decoder.

    input_ids, positions, segment_ids: [B, T] int32 (segment 0 = padding; packed rows use 1, 2, ...).
    lora: the trainable tree for the `layers` (see module doc); `lora_scale` is a scalar or a per-layer
    [L] array (0 for layers not transformed). cache: from `jaxlora.models.generate.init_cache`, with
    `positions` and `segment_ids` already holding this step's entries at `index`.
    Returns float32 logits [B, T, V] (or the final-normed hidden [B, T, D] with `return_hidden`), and
    the updated cache when one was given. With `return_aux_loss` (no cache) returns (out, aux): a MoE
    model's load-balancing loss over the real tokens as transformers computes it (0 for a dense model).
    """
    if positions is None:
        positions = default_positions(input_ids)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    h = embed(params, cfg, input_ids, positions).astype(cfg.runtime.compute_dtype)  # [B, T, D]
    shared = LayerInputs(positions, segment_ids, None, window=None, lora_scale=None, cache=cache)
    if cfg.ple_dim:  # Gemma 4: the per-layer inputs [B, T, L, P]
        shared = shared._replace(ple=per_layer_inputs(params, cfg, input_ids, h))
    per_layer = layer_stack(params, cfg, positions, lora, lora_scale, dropout_rng, cache)
    h, (new_kv, stats) = run_layers(cfg, h, shared, per_layer, lora_dropout)
    h = norm(params["final_norm"], h, cfg)
    out = h if return_hidden else logits_from_hidden(params, cfg, h)
    if cache is None:
        if return_aux_loss:
            aux = moe_aux_loss(cfg, stats, segment_ids > 0) if cfg.num_experts else jnp.zeros((), F32)
            return out, aux
        return out
    return out, new_kv if cfg.mixers else cache._replace(k=new_kv[0], v=new_kv[1])  # hybrid: the whole cache


def layer_stack(params: Params, cfg: DecoderConfig, positions, lora, lora_scale, dropout_rng, cache) -> tuple:
    """What each layer reads, stacked on a leading [L] axis (scanned): (its weights, its adapters, its RoPE
    inverse frequencies [L, R/2], window [L], LoRA scale [L], dropout key, cache (k, v) [L, B, S, K, H])."""
    layers = cfg.num_layers
    return (
        params["layers"],
        lora,
        layer_inv_freq(cfg, positions),  # [L, R/2]
        jnp.asarray(cfg.sliding_windows, jnp.int32),  # [L]
        jnp.broadcast_to(jnp.asarray(lora_scale, F32), (layers,)),  # [L]
        None if dropout_rng is None else jax.random.split(dropout_rng, layers),
        None if cache is None else (cache.k, cache.v),  # [L, B, S, K, H] each
    )


def run_layers(cfg: DecoderConfig, h: jax.Array, shared: LayerInputs, per_layer: tuple, lora_dropout: float):
    """Every layer on the residual stream h [B, T, D], under `lax.scan` (or unrolled with
    `runtime.scan_layers` off), each rematerialized as `runtime.remat` says when training.
    Returns (h, (the updated caches (k, v) stacked, or None; the router statistics [L, 2, E] or None))."""
    rt, cache = cfg.runtime, shared.cache

    def make_layer(cfg):
        layer = partial(block, cfg, lora_dropout=lora_dropout)
        if cache is None and REMAT[rt.remat] is not None:
            # Under scan XLA cannot merge the recomputation into the forward pass anyway; the barriers that
            # prevent it would only slow the step (about 6% on the CPU benchmark).
            layer = jax.checkpoint(layer, policy=REMAT[rt.remat], prevent_cse=not rt.scan_layers)
            if (cfg.mixers or not rt.scan_layers) and rt.remat != "offload":  # several layers per program
                layer = after_cotangent(layer)
        return layer

    layer = make_layer(cfg)

    def one_layer(h, xs):
        p, lo, inv_freq, window, scale, rng, kv = xs
        layer_cache = None if kv is None else hybrid_cache.layer_cache(cache, kv)
        x = shared._replace(
            inv_freq=inv_freq, window=window, lora_scale=scale, dropout_rng=rng, cache=layer_cache
        )
        return layer(p, lo, h, x)

    if cfg.global_head_dim:  # Gemma 4: two layer shapes, KV-shared layers (jaxlora.models.gemma4_layers)
        return run_gemma4(cfg, make_layer, h, shared._replace(ple=None), per_layer, shared.ple)
    if cfg.mixers:  # Qwen3.5: scanned over groups of one period of the layer pattern
        return run_hybrid(cfg, one_layer, h, per_layer, cache)
    if rt.scan_layers:
        return jax.lax.scan(one_layer, h, per_layer)
    outs = []  # one copy of the layer per layer in the program: static slices, no stacked residuals
    for i in range(cfg.num_layers):
        h, kv_stats = one_layer(h, jax.tree.map(lambda a, i=i: a[i], per_layer))
        outs.append(kv_stats)
    return h, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else (None, None))
