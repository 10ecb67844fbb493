"""Orbax checkpoints of the training state: LoRA params, optimizer state, step, data position, RNG.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves no half-written checkpoint that could be taken for a good one. On top of that each step
gets a list of its files with their sizes and SHA-256 (`jaxlora_files.json`, written once orbax is
done), checked before a restore: a latest checkpoint with a missing, truncated or altered file is set
aside as `<step>.corrupt` with one warning line, and the newest intact one is used instead.

Arrays may be sharded over many devices and hosts: every process calls `save` and `restore` (they are
collective; each writes or reads the shards it holds, process 0 the metadata), so `output_dir` must be
on a filesystem all hosts share. The layout does not depend on the mesh: `restore` reads into whatever
shardings the targets carry, so a run saved on 4 devices with FSDP resumes on 1 device or on a
data x tensor mesh.

A step may also carry what the run needs beyond its state to go on exactly (`Checkpointer.carry`: GRPO's
batch of answers in progress): host arrays in the step's item `carry`, and JSON under the metadata's
"carry", in the same step folder, so rotation, the file list and `best/` treat them as the rest.
"""

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlora.errors import UserError
from jaxlora.models.saving import DiskFull, out_of_space


class Checkpointer:
    """Save and restore `{"lora", "opt_state", "rng"}` plus JSON metadata (step, data position)."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        self.extra_meta: dict = {}  # merged into every save's metadata (the best-model tracker's state)
        self.carry: Callable[[int], tuple[dict, dict] | None] | None = None  # step -> (host arrays, JSON)
        # saved with that step beside the state (one process), or None: nothing (`read_carry`)
        newest_intact(self.directory, set_aside=jax.process_index() == 0)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        with _quiet_absl():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write one checkpoint synchronously (overwrites nothing: steps are unique). A full disk raises
        `DiskFull` (one line: the step, the space it needs, the last intact checkpoint) and removes the
        partial step; orbax's threads, which report the failure with tracebacks, are kept quiet."""
        if step in self.manager.all_steps():
            return
        previous = sys.unraisablehook
        sys.unraisablehook = _ignore_closed_loop(previous)
        items = {"state": ocp.args.StandardSave(state)}
        meta = {**meta, **self.extra_meta}
        carried = None if self.carry is None else self.carry(step)
        if carried is not None:
            items["carry"], meta = ocp.args.StandardSave(carried[0]), {**meta, "carry": carried[1]}
        try:
            with _quiet_absl(logging.CRITICAL):
                self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
                self.manager.wait_until_finished()
            if jax.process_index() == 0:
                _write_manifest(self.directory / str(step))
        except Exception as err:
            if not out_of_space(err):
                sys.unraisablehook = previous
                raise
        else:
            sys.unraisablehook = previous
            return
        # raised here, once the error (and the writes its frames hold) is let go; the hook stays, as
        # orbax's abandoned writes may end later, into its closed event loop
        raise self._disk_full(step, state)

    def _disk_full(self, step: int, state: dict) -> DiskFull:
        """The `DiskFull` of saving `step`, after removing what was written of it (process 0)."""
        logging.getLogger("asyncio").addFilter(_not_out_of_space)  # its report of each abandoned write
        gc.collect()  # orbax's abandoned writes, closed now rather than at exit
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            (self.directory / str(step) / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        last = newest_intact(self.directory, set_aside=False, quiet=True)
        if last is None:
            needed = sum(x.nbytes for x in jax.tree.leaves(state))
            then = "; no checkpoint was saved before it: free some space and rerun"
        else:
            needed = sum(p.stat().st_size for p in (self.directory / str(last)).rglob("*") if p.is_file())
            then = (
                f"; the last intact checkpoint is step {last} ({self.directory / str(last)}): free some "
                "space (or move output_dir to a larger disk) and rerun to resume from it"
            )
        return DiskFull(f"saving checkpoint step {step}", self.directory, needed, then)

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore the state into the structure, dtypes and shardings of `like`, and the metadata.

        `like` holds arrays or `jax.ShapeDtypeStruct`s; each restored array gets that leaf's sharding.
        """
        abstract = jax.tree.map(_abstract, like)
        try:
            with _quiet_absl():
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserError(
                f"checkpoint step {step} in {self.directory} does not fit this run ({first}); resume with "
                "the run's own config, or set overwrite=true to start afresh"
            ) from None
        return out["state"], out["meta"]

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of one saved step."""
        with _quiet_absl():
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def read_carry(self, step: int) -> tuple[dict, dict] | None:
        """(host arrays, JSON) that `carry` saved with `step`, or None if it saved nothing there."""
        if not (self.directory / str(step) / "carry").is_dir():
            return None
        with _quiet_absl():
            out = self.manager.restore(
                step, args=ocp.args.Composite(carry=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
            )
        return dict(out["carry"]), out["meta"]["carry"]

    def keep_as_best(self, step: int, best_dir: Path) -> None:
        """Make `best_dir/<step>` the only step under `best_dir`: hard links to the saved step's files
        (copies where links fail), swapped in by renames so that a kill leaves one intact best step."""
        if jax.process_index() != 0:
            return
        best_dir = Path(best_dir)
        best_dir.mkdir(parents=True, exist_ok=True)
        tmp = best_dir / f"{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(self.directory / str(step), tmp, copy_function=_link_or_copy)
        old = [p for p in best_dir.iterdir() if p.name.isdigit() and p.name != str(step)]
        target = best_dir / str(step)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
        for p in old:
            shutil.rmtree(p)

    def close(self) -> None:
        self.manager.close()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def restore_lora(directory: Path) -> tuple[dict, int]:
    """The LoRA tree (host numpy arrays) of the latest checkpoint under `directory`, and its step.

    A partial restore: only `state["lora"]` is read, with shapes from the checkpoint's own metadata, so
    neither the model, the optimizer state nor the mesh is rebuilt (what exporting a run needs).
    """
    root = Path(directory).absolute()
    step = newest_intact(root, set_aside=False)
    if step is None:
        raise UserError(f"no checkpoint under {directory}")
    folder = root / str(step) / "state"
    reader = ocp.PyTreeCheckpointer()
    with _quiet_absl():  # orbax warns that the step's metadata file is not in the item's folder
        tree = reader.metadata(folder).item_metadata.tree
    item = {"lora": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["lora"])}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = reader.restore(folder, args=ocp.args.PyTreeRestore(item, as_numpy, partial_restore=True))
    return out["lora"], step


MANIFEST = "jaxlora_files.json"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder: Path) -> None:
    """List a finished step's files with their sizes and hashes (written atomically)."""
    files = {str(p.relative_to(folder)): [p.stat().st_size, _digest(p)] for p in _files(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(files, indent=0))
    os.replace(tmp, folder / MANIFEST)


def verify_step(folder: Path) -> str | None:
    """What is wrong with one step's folder (a missing, truncated or altered file), or None if intact.

    A step without a file list (saved by an older version, or killed just before writing it) is taken
    as intact when orbax marked it committed."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None if (folder / "commit_success.txt").is_file() else "not committed"
    try:
        files = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
        if _digest(path) != digest:
            return f"{name} was altered"
    return None


def _set_aside(folder: Path) -> None:
    target, n = folder.with_name(f"{folder.name}.corrupt"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.corrupt{n}"), n + 1
    os.replace(folder, target)


def newest_intact(directory: Path, *, set_aside: bool, quiet: bool = False) -> int | None:
    """The newest step under `directory` whose files are intact (None if there is no step).

    Newer broken steps get one warning line each; with `set_aside` (process 0 of a run) they are renamed
    `<step>.corrupt` so that the run can save those steps again. UserError when no step is intact.
    """
    root = Path(directory)
    steps = (
        sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
        if root.is_dir()
        else []
    )
    problems = []
    for step in steps:
        problem = verify_step(root / str(step))
        if problem is None:
            for bad, why in [] if quiet else problems:
                aside = f"; moved to {bad}.corrupt" if set_aside else ""
                print(
                    f"warning: checkpoint step {bad} in {root} is incomplete or corrupt ({why}); "
                    f"using step {step}{aside}",
                    file=sys.stderr,
                )
                if set_aside:
                    _set_aside(root / str(bad))
            return step
        problems.append((step, problem))
    if problems:
        listed = "; ".join(f"step {s}: {why}" for s, why in problems)
        raise UserError(
            f"no intact checkpoint in {root} ({listed}); set overwrite=true to start the run afresh"
        )
    return None


def _not_out_of_space(record: logging.LogRecord) -> bool:
    """A logging filter: drop the records of a write that ran out of space (said once, as `DiskFull`)."""
    return not (record.exc_info and out_of_space(record.exc_info[1]))


def _ignore_closed_loop(previous):
    """An unraisable hook that drops what orbax's failed writes leave behind: their callbacks into its
    event loop, closed by then, raise "Event loop is closed" one by one; `previous` gets the rest."""

    def hook(info) -> None:
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            return
        previous(info)

    return hook


@contextlib.contextmanager
def _quiet_absl(level: int = logging.ERROR):
    absl = logging.getLogger("absl")
    old = absl.level
    absl.setLevel(level)
    try:
        yield
    finally:
        absl.setLevel(old)


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
