"""AdamW with warmup and a decay schedule, and global-norm clipping, from `TrainSection`."""

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


def make_optimizer(
    train: TrainSection, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax AdamW (decoupled weight decay) behind optional global-norm clipping."""
    schedule = learning_rate_schedule(train, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=train.adam_beta1,
        b2=train.adam_beta2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
    )
    if train.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(train.max_grad_norm), adamw), schedule
