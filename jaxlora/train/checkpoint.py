"""Orbax checkpoints of the training state: LoRA params, optimizer state, step, data position, RNG.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves no half-written checkpoint that could be taken for a good one.

Arrays may be sharded over many devices and hosts: every process calls `save` and `restore` (they are
collective; each writes or reads the shards it holds, process 0 the metadata), so `output_dir` must be
on a filesystem all hosts share. The layout does not depend on the mesh: `restore` reads into whatever
shardings the targets carry, so a run saved on 4 devices with FSDP resumes on 1 device or on a
data x tensor mesh.
"""

import contextlib
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlora.errors import UserError


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
        """Restore the state into the structure, dtypes and shardings of `like`, and the metadata.

        `like` holds arrays or `jax.ShapeDtypeStruct`s; each restored array gets that leaf's sharding.
        """
        abstract = jax.tree.map(_abstract, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()


def restore_lora(directory: Path) -> tuple[dict, int]:
    """The LoRA tree (host numpy arrays) of the latest checkpoint under `directory`, and its step.

    A partial restore: only `state["lora"]` is read, with shapes from the checkpoint's own metadata, so
    neither the model, the optimizer state nor the mesh is rebuilt (what exporting a run needs).
    """
    root = Path(directory).absolute()
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not steps:
        raise UserError(f"no checkpoint under {directory}")
    folder = root / str(steps[-1]) / "state"
    reader = ocp.PyTreeCheckpointer()
    with _quiet_absl():  # orbax warns that the step's metadata file is not in the item's folder
        tree = reader.metadata(folder).item_metadata.tree
    item = {"lora": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["lora"])}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = reader.restore(folder, args=ocp.args.PyTreeRestore(item, as_numpy, partial_restore=True))
    return out["lora"], steps[-1]


@contextlib.contextmanager
def _quiet_absl():
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def rng_to_array(key) -> np.ndarray:
    """The raw uint32 data of a typed PRNG key (what checkpoints store)."""
    return np.asarray(jax.random.key_data(key))


def rng_from_array(data) -> jax.Array:
    """A typed PRNG key from `rng_to_array`'s data (host or device array)."""
    return jax.random.wrap_key_data(jax.numpy.asarray(data, dtype=jax.numpy.uint32))
