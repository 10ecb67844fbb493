"""The one training step and the one eval step, for every objective (`jaxlora.train.objective`).

`train_step(adapter, opt_state, base, batch, rng, lora_scale, *extra) -> (adapter, opt_state, metrics)`:
gradients exist for `adapter.trainable` only (`jaxlora.lora.Adapter`), which is all the optimizer state
covers; the adapter's frozen leaves and the frozen base are ordinary (non-differentiated) arguments.
Micro-batches ([A, B, ...] arrays, A = gradient accumulation) are scanned, their gradients and metric sums
summed, reduced across devices by the plan's `Collective`, and divided once by the objective's
denominator, so accumulation equals one large batch. A non-finite loss or gradient leaves the state
unchanged and sets `metrics["nonfinite"]`, which the loop reads at its logging interval.

The same step runs under every parallel strategy (`jaxlora.parallel`): under `jit` (single device or a
sharded mesh) XLA partitions it from the arrays' shardings and the collective is the identity; under
`pmap` the collective sums over the devices before dividing, so the loss is normalized exactly as on one
device.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlora.lora.trainable import Adapter, join
from jaxlora.parallel.collective import LOCAL, Collective
from jaxlora.train.objective import Objective, StepSpec
from jaxlora.train.sft import BATCH_KEYS, Sft, loss_and_count, loss_terms

__all__ = [
    "BATCH_KEYS",
    "StepSpec",
    "loss_and_count",
    "loss_terms",
    "make_eval_step",
    "make_train_step",
]


def _objective(objective: Objective | StepSpec) -> Objective:
    return Sft(objective) if isinstance(objective, StepSpec) else objective


def make_train_step(
    objective: Objective | StepSpec, optimizer: optax.GradientTransformation, collective: Collective = LOCAL
) -> Callable:
    """Build `train_step(adapter, opt_state, base, batch, rng, lora_scale, *extra)` for `objective` (a bare
    `StepSpec` means SFT); `collective` is the plan's (`Plan.collective`: sums over pmap's devices).
    `opt_state` is `optimizer.init(adapter.trainable)`."""
    objective = _objective(objective)

    def loss(trainable, frozen, *args):
        return objective.loss(join(trainable, frozen), *args)

    value_grad = jax.value_and_grad(loss, has_aux=True)

    def train_step(adapter: Adapter, opt_state, base, batch, rng, lora_scale, *extra):
        lora, frozen = adapter.trainable, adapter.frozen
        accum = jax.tree.leaves(batch)[0].shape[0]
        rngs = jax.random.split(collective.local_rng(rng), accum)
        totals = collective.reduce(objective.totals(batch))

        def micro(carry, xs):
            g_acc, v_acc, s_acc = carry
            mb, r = xs
            (v, sums), g = value_grad(lora, frozen, base, mb, lora_scale, r, totals, *extra)
            return (jax.tree.map(jnp.add, g_acc, g), v_acc + v, jax.tree.map(jnp.add, s_acc, sums)), None

        sums0 = {k: jnp.float32(0) for k in objective.sum_names}
        carry = (jax.tree.map(jnp.zeros_like, lora), jnp.float32(0), sums0)
        (g_sum, value, sums), _ = jax.lax.scan(micro, carry, (batch, rngs))
        g_sum, value, sums = collective.reduce((g_sum, value, sums))
        denom, metrics, checked = objective.finish(value, sums, totals)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        ok = jnp.isfinite(grad_norm)
        for x in checked:
            ok = ok & jnp.all(jnp.isfinite(x))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        out = {"loss": metrics.pop("loss"), "grad_norm": grad_norm, "tokens": metrics.pop("tokens")}
        out["nonfinite"] = ~ok
        out.update(metrics)
        return Adapter(keep(new_lora, lora), frozen), keep(new_opt, opt_state), out

    return train_step


def make_eval_step(objective: Objective | StepSpec, collective: Collective = LOCAL) -> Callable:
    """Build `eval_step(adapter, base, batch, lora_scale, *extra)` for one [B, ...] validation batch: the
    objective's sums over it (over all devices), as `eval_result` shapes them. `adapter`: an `Adapter`, or
    a joined LoRA tree (an exported or restored adapter: evaluation takes no gradient)."""
    objective = _objective(objective)

    def eval_step(adapter: Adapter | dict, base, batch, lora_scale, *extra):
        lora = adapter.tree() if isinstance(adapter, Adapter) else adapter
        sums = objective.eval_sums(lora, base, batch, lora_scale, *extra)
        return objective.eval_result(collective.reduce(sums))

    return eval_step
