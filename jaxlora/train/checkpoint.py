"""Orbax checkpoints of the training state: LoRA params, optimizer state, step, data position, RNG.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves no half-written checkpoint that could be taken for a good one.
"""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Save and restore `{"lora", "opt_state", "rng"}` plus JSON metadata (step, data position)."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write one checkpoint synchronously (overwrites nothing: steps are unique)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore the state into the structure (and shardings) of `like`, and the metadata."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()


def rng_to_array(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def rng_from_array(data) -> jax.Array:
    return jax.random.wrap_key_data(jax.numpy.asarray(data, dtype=jax.numpy.uint32))
