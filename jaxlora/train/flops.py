"""FLOPs of one LoRA training step, counted by hand from the architecture (docs/performance.md).

Matmul FLOPs only (a multiply-add is 2 FLOPs; norms, RoPE, softmax and the optimizer are left out). Per
token of a batch of rows of length T, for a frozen linear layer [in, out] and an adapter of rank r on it:

    frozen weight   forward 2*in*out, activation gradient 2*in*out, no weight gradient     = 4*in*out
    adapter         forward 2*r*(in+out), backward 4*r*(in+out) (dA, dB and the input
                    gradient through A and B)                                             = 6*r*(in+out)
    LM head [D, V]  forward 2*D*V, activation gradient 2*D*V (frozen, tied or not)         = 4*D*V
    attention       per layer and query, over the k keys it attends to (causal: k = t+1 for the query at
                    0-based index t, min(t+1, window) with a sliding window): forward QK^T and PV,
                    2*2*H*k per head; backward dQ, dK, dV and dP, twice the forward      = 12*N*H*k

Their sum over all tokens is the useful work (`model`); MFU divides it by the step time and the peak.
What the backward pass recomputes is counted apart (`recompute`), never as useful work:

    always          the LM head logits of each loss chunk (chunked cross-entropy)          2*D*V
                    the attention scores QK^T (flash-style backward keeps only the output
                    and log-sum-exp)                                                       2*N*H*k
    remat "none"    nothing more (every activation the backward pass reads is kept)
    remat "fast"    the rank-r products x @ A of every adapter                              2*in*r
    remat "dots"    the attention forward (QK^T and PV) again (matmul outputs are kept)    4*N*H*k
    remat "lean"    the layer's linears again except k, v (kept) and the MLP output projection
                    (nothing reads its output): 2*in*out, their adapters 2*r*(in+out); for k, v
                    and the output projection only x @ A (for dB)                          2*in*r
    remat "full"    the layer forward again: frozen weights, adapters and attention, except the MLP
    (minimal,       output projection's own product (nothing in the backward pass reads it)
     offload)                                           2*in*out + 2*r*(in+out) + 4*N*H*k

Mixture of experts (Mixtral, Qwen3-MoE): only the active parameters count. Per token the router [D, E] and
the k routed experts (gate_up [D, 2F] and down [F, D] each) are the MLP's frozen weights, and an expert
adapter (`target_parameters`) costs its rank-r work k times; the E - k idle experts cost nothing, so MFU
is not inflated by weights no token uses.

Hybrid layers (Qwen3.5): a linear layer of a token mixer counts in the layers that have that mixer only
(the DeltaNet's projections in the `linear_attention` layers, q/k/v/o in the `full_attention` ones), and
attention runs in the full layers only. The gated delta rule of a DeltaNet layer counts as its recurrent
form per token and value head, reading, updating and applying the [dk, dv] state: forward 6*dk*dv, backward
twice that (18*dk*dv in all, in `attention`, the token mixing); its chunked form's intra-chunk products and
the causal conv are left out. `full` remat recomputes its forward (6*dk*dv).

Embedding lookups and the elementwise work cost no FLOPs here. Example (stories260K, r=8 all-linear):

    train_step_flops(cfg, r=8, targets=None, batch=8, seq_len=256)["model"]
"""

import numpy as np

from jaxlora.models.config import REMAT_POLICIES, DecoderConfig
from jaxlora.models.hybrid_layers import MIXER_GROUPS
from jaxlora.models.targets import linear_dims, param_targets

REMATS = REMAT_POLICIES  # the train.remat policies


def attended_keys(seq_len: int, window: int = 0) -> int:
    """Sum over the queries of one causal row of the number of keys each attends to (itself included)."""
    k = np.arange(1, seq_len + 1)
    if window:
        k = np.minimum(k, window)
    return int(k.sum())


def train_step_flops(
    cfg: DecoderConfig,
    r: int,
    targets: list[tuple[str, str]] | None,
    batch: int,
    seq_len: int,
    remat: str = "lean",
    adapted_layers: int | None = None,
) -> dict[str, int]:
    """Matmul FLOPs of one optimizer step over `batch` full rows of `seq_len` tokens.

    targets: (group, module) pairs carrying an adapter (`jaxlora.lora.target_paths`), None = all linear
    layers; adapted_layers: how many layers have adapters (default all). Returns integers: `model` (useful:
    forward + backward), `recompute` (remat and flash-style recomputation, not useful), and the parts of
    `model`: `frozen`, `adapters`, `attention`, `lm_head`.
    """
    if remat not in REMATS:
        raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
    dims = linear_dims(cfg)
    # MoE weights -> (in, out, how many times each token uses it): the router once, an expert k times.
    moe = {
        t.key: (t.in_features, t.out_features, cfg.experts_per_token if t.experts else 1)
        for t in param_targets(cfg)
    }
    targets = list(dims) if targets is None else list(targets)
    layers = cfg.num_layers
    adapted = layers if adapted_layers is None else adapted_layers
    tokens = batch * seq_len

    share = _layer_share(cfg)
    # (in, out, uses per token averaged over the layers: a hybrid mixer's modules in its share of them)
    active = {k: (i, o, n * share.get(k[0], 1.0)) for k, (i, o, n) in _uses(dims, moe).items()}
    w_frozen = sum(i * o * n for i, o, n in active.values())  # active weights of one layer, per token
    w_adapter = sum(r * (active[t][0] + active[t][1]) * active[t][2] for t in targets)  # per token
    xa = sum(r * active[t][0] * active[t][2] for t in targets)  # the A products x @ A of one layer
    nh = cfg.num_heads * cfg.head_dim
    keys, delta = _token_mixing(cfg, batch, seq_len)
    dv = cfg.hidden_size * cfg.vocab_size

    parts = {
        "frozen": round(4 * w_frozen * layers * tokens),
        "adapters": round(6 * w_adapter * adapted * tokens),
        "attention": 12 * nh * keys + 3 * delta,
        "lm_head": 4 * dv * tokens,
    }
    recompute = 2 * dv * tokens + 2 * nh * keys
    last = list(active)[-1]  # the MLP output projection (the experts' down_proj in a MoE model)
    if remat == "fast":
        recompute += 2 * xa * adapted * tokens
    elif remat == "dots":
        recompute += 4 * nh * keys
    elif remat == "lean":  # k and v are kept, the output projection's product is never read
        kept = [key for key in active if key in (("attn", "k_proj"), ("attn", "v_proj")) or key == last]
        recompute += 2 * (w_frozen - sum(_weight(active[key]) for key in kept)) * layers * tokens
        recompute += 2 * sum(_adapter(active[t], r, t not in kept) for t in targets) * adapted * tokens
    elif remat in ("full", "minimal", "offload"):
        recompute += 2 * (w_frozen - _weight(active[last])) * layers * tokens + 4 * nh * keys + delta
        recompute += 2 * sum(_adapter(active[t], r, t != last) for t in targets) * adapted * tokens
    return {"model": sum(parts.values()), "recompute": round(recompute), **parts}


def _token_mixing(cfg: DecoderConfig, batch: int, seq_len: int) -> tuple[int, int]:
    """(keys attended over the attention layers and rows, the gated delta rule's forward FLOPs over the
    DeltaNet layers and tokens; 0 without any)."""
    kinds = cfg.mixers or ("full_attention",) * cfg.num_layers
    windows = [w for w, kind in zip(cfg.sliding_windows, kinds, strict=True) if kind != "linear_attention"]
    keys = sum(attended_keys(seq_len, w) for w in windows) * batch
    if "linear_attention" not in kinds:
        return keys, 0
    (_, hv), (dk, dv) = cfg.linear_heads, cfg.linear_head_dims
    return keys, 6 * hv * dk * dv * kinds.count("linear_attention") * batch * seq_len


def _uses(dims: dict, moe: dict) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Every per-layer weight -> (in, out, uses per token): the linears once, MoE weights as `moe` says."""
    return {**{k: (i, o, 1) for k, (i, o) in dims.items()}, **moe}


def _layer_share(cfg: DecoderConfig) -> dict[str, float]:
    """A hybrid decoder's token-mixer groups -> the fraction of the layers holding one; {} otherwise."""
    if not cfg.mixers:
        return {}
    return {group: cfg.mixers.count(kind) / cfg.num_layers for group, kind in MIXER_GROUPS.items()}


def _weight(dims: tuple[int, int, int]) -> int:
    """Multiply-adds per token of a frozen linear (in, out, uses per token)."""
    return dims[0] * dims[1] * dims[2]


def _adapter(dims: tuple[int, int, int], r: int, with_b: bool) -> int:
    """Multiply-adds per token of an adapter's forward: x @ A, and (x @ A) @ B when `with_b`."""
    i, o, n = dims
    return r * (i + (o if with_b else 0)) * n
