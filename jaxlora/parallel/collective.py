"""How one training step combines its devices: the hooks a `Plan` hands to the step.

Under `jit` (one device or a sharded mesh) XLA partitions the step from the arrays' shardings, so the
step's sums are already global: both hooks are the identity. Under `pmap` each device runs the step on
its own rows, so `reduce` sums over the devices (`psum`: a mean of per-device means would weight the
devices' rows wrongly) and `local_rng` gives each device its own dropout key. The step and the
objectives never name an axis.
"""

import dataclasses
from collections.abc import Callable

import jax


def _same(x):
    return x


@dataclasses.dataclass(frozen=True)
class Collective:
    """`reduce(tree)`: the sum over the devices of each leaf; `local_rng(key)`: this device's key."""

    reduce: Callable = _same
    local_rng: Callable = _same


LOCAL = Collective()  # jit: XLA sums across the mesh itself


def pmap_collective(axis_name: str) -> Collective:
    """The hooks inside `jax.pmap(..., axis_name=axis_name)`."""
    return Collective(
        reduce=lambda tree: jax.lax.psum(tree, axis_name),
        local_rng=lambda key: jax.random.fold_in(key, jax.lax.axis_index(axis_name)),
    )
