"""From rewards to GRPO's advantages, and the rollout's metrics, as TRL's `GRPOTrainer` computes them
(`_generate_and_score_completions`, `_generate`); host-side numpy in float32, called by the loop on each
batch of completions before the train step.

Completions come in groups: rows [g * G, (g + 1) * G) are the G = `num_generations` completions of one
prompt. `per_func` [N, F] holds each reward function's reward per completion, NaN where the function
returned None (not applicable): NaN-aware sums and means leave those out, and a completion no function
scores gets advantage 0.
"""

import numpy as np

__all__ = ["advantages", "completion_metrics", "reward_metrics", "truncated", "weighted_rewards"]

F32 = np.float32


def _nanmean(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """torch.nanmean: NaN when a slice has no number (without numpy's warning)."""
    ok = ~np.isnan(x)
    total = np.sum(np.where(ok, x, 0), axis=axis, keepdims=keepdims, dtype=F32)
    count = np.sum(ok, axis=axis, keepdims=keepdims).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(F32)


def _nanstd(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """TRL's `nanstd`: the Bessel-corrected standard deviation over the non-NaN values (NaN below 2)."""
    mean = _nanmean(x, axis=axis, keepdims=True)
    var = _nanmean((x - mean) ** 2, axis=axis, keepdims=keepdims)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        correction = np.where(count > 1, count / (count - 1), np.nan).astype(F32)
        return np.sqrt(var * correction).astype(F32)


def _weights(per_func: np.ndarray, weights) -> np.ndarray:
    return np.ones(per_func.shape[1], F32) if weights is None else np.asarray(weights, F32)


def weighted_rewards(per_func: np.ndarray, weights=None) -> np.ndarray:
    """[N] the weighted sum of each completion's rewards (None ones left out); NaN where none applies."""
    per_func = np.asarray(per_func, F32)
    r = np.nansum(per_func * _weights(per_func, weights)[None], axis=1, dtype=F32)
    return np.where(np.isnan(per_func).all(axis=1), np.nan, r).astype(F32)


def _group_std(rewards: np.ndarray, g: int, scale: str) -> np.ndarray:
    """[N] the std each advantage is divided by (and `frac_reward_zero_std` reads)."""
    n = rewards.shape[0]
    if scale in ("group", "none"):
        if g < 2:
            return np.zeros_like(rewards)
        return np.repeat(_nanstd(rewards.reshape(-1, g), axis=1), g)
    if scale == "batch":
        return np.full_like(rewards, _nanstd(rewards)) if n > 1 else np.zeros_like(rewards)
    raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")


def advantages(
    per_func: np.ndarray,
    weights=None,
    num_generations: int = 8,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [N], zero_std [N] bool) from rewards [N, F] in groups of `num_generations`.

    sum_then_normalize: A = (r - group mean) / (std + 1e-4), r the weighted sum, std the group's
    (`scale_rewards` group), the batch's (batch) or none (no division). normalize_then_sum: each function
    normalized within its groups first, then the weighted sum normalized over the batch. `zero_std`
    marks completions whose std is 0 (`frac_reward_zero_std`)."""
    per_func = np.asarray(per_func, F32)
    g, w = num_generations, _weights(per_func, weights)
    unscorable = np.isnan(per_func).all(axis=1)
    if aggregation == "sum_then_normalize":
        rewards = weighted_rewards(per_func, w)
        mean = np.repeat(_nanmean(rewards.reshape(-1, g), axis=1), g)
        std = _group_std(rewards, g, scale_rewards)
        adv = rewards - mean
        if scale_rewards != "none":
            adv = adv / (std + F32(1e-4))
    elif aggregation == "normalize_then_sum":
        grouped = per_func.reshape(-1, g, per_func.shape[1])
        mean_k = _nanmean(grouped, axis=1, keepdims=True)
        std_k = _nanstd(grouped, axis=1, keepdims=True) if g > 1 else np.zeros_like(mean_k)
        normed = ((grouped - mean_k) / (std_k + F32(1e-4))).reshape(per_func.shape)
        rewards = np.nansum(normed * w[None], axis=1, dtype=F32)
        rewards = np.where(unscorable, np.nan, rewards).astype(F32)
        n = rewards.shape[0]
        std = np.full_like(rewards, _nanstd(rewards)) if n > 1 else np.zeros_like(rewards)
        adv = (rewards - _nanmean(rewards)) / (std + F32(1e-4))
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    zero_std = np.abs(std) <= 1e-8  # torch.isclose(std, 0): False for NaN
    return np.nan_to_num(adv.astype(F32), nan=0.0), zero_std


def reward_metrics(per_func: np.ndarray, names, weights=None, zero_std: np.ndarray | None = None) -> dict:
    """TRL's reward metrics: `rewards/<name>/mean` and `/std` per function (over the completions it
    scores), `reward` and `reward_std` of the weighted sum, `frac_reward_zero_std` from `advantages`."""
    per_func = np.asarray(per_func, F32)
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(_nanmean(per_func[:, i]))
        out[f"rewards/{name}/std"] = float(_nanstd(per_func[:, i]))
    rewards = weighted_rewards(per_func, weights)
    out["reward"], out["reward_std"] = float(_nanmean(rewards)), float(_nanstd(rewards))
    if zero_std is not None:
        out["frac_reward_zero_std"] = float(np.mean(zero_std, dtype=F32))
    return out


def truncated(completion_ids, stop_ids) -> np.ndarray:
    """[N] bool: the completion (its token ids through the first stop token) does not end with one of
    `stop_ids` (the EOS ids and the pad id, as TRL), so `max_completion_length` cut it."""
    stop = set(stop_ids)
    return np.array([not ids or ids[-1] not in stop for ids in completion_ids], bool)


def completion_metrics(lengths, is_truncated) -> dict:
    """TRL's `completions/*` metrics from each completion's token count [N] and whether it was cut at
    `max_completion_length` without an EOS [N] (the `terminated` ones are the others; 0 if none)."""
    lengths = np.asarray(lengths, F32)
    cut = np.asarray(is_truncated, bool)
    done = lengths[~cut] if (~cut).any() else np.zeros(1, F32)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(cut.astype(F32).mean()),
        "completions/mean_terminated_length": float(done.mean()),
        "completions/min_terminated_length": float(done.min()),
        "completions/max_terminated_length": float(done.max()),
    }
