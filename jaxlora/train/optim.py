"""AdamW with warmup and a decay schedule, and global-norm clipping, from `TrainSection` (LoRA+ too)."""

import jax
import optax

from jaxlora.config import TrainSection


def learning_rate_schedule(train: TrainSection, total_steps: int) -> optax.Schedule:
    """Linear warmup (steps or ratio) from 0 to `learning_rate`, then cosine, linear or constant."""
    peak = train.learning_rate
    warmup = int(train.warmup_ratio * total_steps) if train.warmup_ratio is not None else train.warmup_steps
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * train.min_lr_ratio
    if train.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
    elif train.lr_schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def loraplus_labels(lora: dict) -> dict:
    """Leaf labels: "b" for B, its bias and DoRA magnitudes (PEFT LoRA+'s groupB), else "a"."""

    def label(path, _leaf) -> str:
        return "b" if getattr(path[-1], "key", None) in ("b", "m", "bias") else "a"

    return jax.tree_util.tree_map_with_path(label, lora)


def make_optimizer(
    train: TrainSection, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax AdamW (decoupled weight decay) behind optional global-norm clipping.

    With `train.loraplus_lr_ratio` (LoRA+), B and DoRA magnitudes get their own AdamW at ratio x the
    schedule, the rest (A) the schedule itself, as PEFT's `create_loraplus_optimizer` (same weight decay).
    """
    schedule = learning_rate_schedule(train, total_steps)

    def adamw_at(lr) -> optax.GradientTransformation:
        return optax.adamw(
            lr, b1=train.adam_beta1, b2=train.adam_beta2, eps=train.adam_eps, weight_decay=train.weight_decay
        )

    ratio = getattr(train, "loraplus_lr_ratio", None)
    if ratio is None:
        adamw = adamw_at(schedule)
    else:
        b_lr = lambda step: ratio * schedule(step)  # noqa: E731
        adamw = optax.multi_transform({"a": adamw_at(schedule), "b": adamw_at(b_lr)}, loraplus_labels)
    if train.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(train.max_grad_norm), adamw), schedule
