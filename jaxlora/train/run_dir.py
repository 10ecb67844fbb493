"""The run folder (`output_dir`): claim it, resume a run or start clean, never overwrite unless asked.

What a run leaves there: config.yaml (the resolved config), checkpoints/, metrics.jsonl, tensorboard/,
adapter/ and run_state.json (with `data.add_special_tokens` also tokenizer/ and added_tokens.safetensors).
Opening a run only decides and checks (nothing is written): the folder is a writable directory, and a run
being resumed was made with a compatible config (`config_changes`). The run's files are written by
`RunDir.commit`, once setup (model, tokenizer, data) has succeeded, so a setup that fails leaves nothing
behind that blocks the corrected rerun. A folder that holds only the files of a run stopped before its
first checkpoint is such a leftover and is reused. A run that finished, and that this config gives
nothing more to do (`finished_step`), is left as it is. With several processes, every process decides whether
to resume before process 0 cleans anything; then only process 0 writes here, except checkpoints/, which
all processes write together (see `jaxlora.train.checkpoint`).
"""

import dataclasses
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import yaml

from jaxlora.config import Config, config_from_dict
from jaxlora.errors import UserError
from jaxlora.parallel import Plan
from jaxlora.train.checkpoint import newest_intact

BEST_DIR = "best_checkpoint"  # checkpoint.keep_best: the step with the lowest eval loss
RUN_FILES = (
    "checkpoints",
    "tensorboard",
    "metrics.jsonl",
    "adapter",
    "config.yaml",
    "run_state.json",
    BEST_DIR,
    "samples.jsonl",
    "wandb",
    "tokenizer",  # data.add_special_tokens: the run's tokenizer and the rows drawn for the new tokens
    "added_tokens.safetensors",
)
LOCK = ".jaxlora.lock"  # the pid and host of the run that holds the folder

# Keys a resumed run may change (one line printed each); any other change is refused. A prefix ending
# in "." covers a whole section.
COMPATIBLE = (
    "train.max_steps",
    "train.num_epochs",
    "train.eval_every_steps",
    "train.eval_batches",
    "train.eval_samples",
    "train.sample_prompts",
    "train.sample_max_new_tokens",
    "train.remat",
    "train.loss_chunk_size",
    "checkpoint.",
    "logging.",
    "parallel.",
    "model.attention",
    "data.num_proc",
    "data.cache_dir",
    "output_dir",
    "overwrite",
)


@dataclasses.dataclass
class RunDir:
    """An opened run folder; its files are written from `commit` on."""

    path: Path
    resuming: bool  # its latest checkpoint is picked up
    main: bool  # this process writes the run's files (process 0)
    clean: bool = False  # commit removes an earlier run's files first (overwrite, or a failed setup's)
    created: bool = False  # this run created the folder (removed again if setup fails)
    locked: bool = False
    finished: int | None = None  # the step the run being resumed finished at, with nothing left to do

    def commit(self, cfg: Config, plan: Plan, total_steps: int) -> None:
        """Setup succeeded: take the folder (clean an overwritten run, save config.yaml for a run of
        `total_steps`)."""
        plan.barrier("jaxlora-output-dir-read")
        if self.main:
            if self.clean:
                _remove_run_files(self.path)
            save_run_config(cfg, self.path / "config.yaml", total_steps)
        plan.barrier("jaxlora-output-dir-ready")

    def abandon(self) -> None:
        """Setup failed before `commit`: leave the folder as it was found."""
        self.release()
        if self.created and self.main:
            try:
                self.path.rmdir()  # only if still empty
            except OSError:
                pass

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False


def save_run_config(cfg: Config, path: Path, total_steps: int) -> None:
    """config.yaml: the resolved config (`save_config`), with the warmup written once: the key the run
    takes it from (`train.warmup_ratio` when set, else `train.warmup_steps`), the other left out, and a
    comment with the steps it comes to (as `jaxlora.train.optim.learning_rate_schedule` counts them)."""
    t = cfg.train
    if t.warmup_ratio is not None:
        key, warmup = "warmup_ratio", int(t.warmup_ratio * total_steps)
        source = "train.warmup_ratio"
    else:
        key, warmup = "warmup_steps", t.warmup_steps
        source = "train.warmup_steps" if "warmup_steps" in t.model_fields_set else "the default"
    if warmup > max(total_steps - 1, 0):
        warmup, source = max(total_steps - 1, 0), f"{source}, cut to the run's length"
    unused = "warmup_steps" if key == "warmup_ratio" else "warmup_ratio"
    data = cfg.to_dict()
    del data["train"][unused]
    head, train, rest = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).partition("\ntrain:\n")
    note = f"  # warmup: {warmup} of the run's {total_steps} steps ({source})"
    rest = re.sub(rf"^(  {key}: .*)$", lambda m: m.group(1) + note, rest, count=1, flags=re.MULTILINE)
    text = head + train + rest
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# jaxlora resolved config\n" + text, encoding="utf-8")
    os.replace(tmp, path)


def open_run(cfg: Config, resume: bool, plan: Plan) -> RunDir:
    """Claim `cfg.output_dir` for this run and decide whether to resume; writes nothing but the folder
    (when missing) and its lock. Raises UserError for a folder that holds something else (unless
    `overwrite`), a run made with an incompatible config, or a path that is not a writable folder."""
    out = Path(cfg.output_dir).expanduser()
    created = _make_dir(out) if plan.is_main else False
    plan.barrier("jaxlora-output-dir-made")
    run = RunDir(out, False, plan.is_main, created=created)
    try:
        if plan.is_main:
            run.locked = _lock(out)
        run.resuming, run.clean = _decide(cfg, out, resume)
        run.finished = finished_step(cfg, out) if run.resuming else None
        if run.resuming and run.finished is None:
            for line in _resume_notes(cfg, out):
                print(line, file=sys.stderr)
    except BaseException:
        run.abandon()
        raise
    return run


def finished_step(cfg: Config, out: Path) -> int | None:
    """The step a finished run in `out` ended at, when this config leaves it nothing to do: run_state.json
    says finished, its newest intact checkpoint is that step, and the run's length is unchanged (or a
    `train.max_steps` at or below that step). None: the run goes on (or resumes after a signal)."""
    try:
        state = json.loads((out / "run_state.json").read_text())
        step, done = int(state["step"]), state["finished"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not done or newest_intact(out / "checkpoints", set_aside=False, quiet=True) != step:
        return None
    saved = _saved_config(out / "config.yaml").get("train", {}) if (out / "config.yaml").is_file() else {}
    t = cfg.train
    same = saved.get("max_steps") == t.max_steps and saved.get("num_epochs") == t.num_epochs
    shorter = t.num_epochs is None and t.max_steps is not None and t.max_steps <= step
    return step if same or shorter else None


def _make_dir(out: Path) -> bool:
    """Create `out` if missing (True if created); UserError unless it is a writable directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder; choose a folder path")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"output_dir {out} cannot be created ({err.strerror}); choose a writable folder"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out} is not writable; choose a writable folder")
    return created


def _lock(out: Path) -> bool:
    """Take the folder's lock file atomically; refuse a folder that a live run holds."""
    lock = out / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a killed run
                continue
            raise UserError(
                f"output_dir {out} is in use by another run (process {pid} on {host}); wait for it to end, "
                f"or remove {lock} if that run is gone"
            ) from None
        except OSError as err:
            raise UserError(
                f"output_dir {out} is not writable ({err.strerror}); choose a writable folder"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    raise UserError(f"output_dir {out}: could not take {lock}; remove it and retry")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _has_checkpoint(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def _decide(cfg: Config, out: Path, resume_flag: bool) -> tuple[bool, bool]:
    """(resume, clean): whether to resume the folder's run and whether commit removes old run files."""
    mode = "always" if resume_flag else cfg.checkpoint.resume
    has_ckpt = _has_checkpoint(out)
    if cfg.overwrite and resume_flag:
        raise UserError("--resume and overwrite=true contradict each other; drop one")
    if mode == "always" and not has_ckpt:
        stopped = " (its run stopped before the first checkpoint)" if (out / "config.yaml").exists() else ""
        raise UserError(
            f"nothing to resume: {out / 'checkpoints'} has no checkpoint{stopped}; run without --resume"
        )
    if has_ckpt and mode != "never" and not cfg.overwrite:
        newest_intact(out / "checkpoints", set_aside=False, quiet=True)  # UserError if none is intact
        check_config_changes(cfg, out)  # refuses an incompatible one
        if (out / "adapter").exists() and not (out / "adapter").is_dir():  # the export would refuse it
            raise UserError(
                f"{out / 'adapter'} is a file; the run writes its PEFT adapter there: move the file away"
            )
        return True, False
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if not others:
        return False, False
    leftover = not has_ckpt and set(others) <= set(RUN_FILES)  # a run stopped before its first checkpoint
    if not leftover and not cfg.overwrite:
        what = "a run (set checkpoint.resume to auto to resume it)" if has_ckpt else "no run to resume"
        raise UserError(
            f"output_dir {out} is not empty and holds {what}; choose a new output_dir or set overwrite=true"
        )
    return False, True


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# ----------------------------------------------------------------------------------------------------
# Config changes against the run being resumed


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _saved_config(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return config_from_dict(raw).model_dump(mode="json")  # defaults of fields added since
    except Exception:  # noqa: BLE001 - a config from another version: compare what it says
        return raw


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(compatible, incompatible) changes between two configs (as dicts), as `key old -> new` texts."""
    a, b = _flat(old), _flat(new)
    if a.get("train.warmup_ratio") is not None and b.get("train.warmup_ratio") is not None:
        a.pop("train.warmup_steps", None)  # not used by either run (config.yaml leaves it out)
        b.pop("train.warmup_steps", None)
    compatible, incompatible = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        text = f"{key} {a.get(key)!r} -> {b.get(key)!r}"
        ok = any(key == c or (c.endswith(".") and key.startswith(c)) for c in COMPATIBLE)
        (compatible if ok else incompatible).append(text)
    return compatible, incompatible


def check_config_changes(cfg: Config, out: Path) -> list[str]:
    """Refuse to resume a run made with an incompatible config; the compatible changes, as found."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return []
    old = _saved_config(saved)
    compatible, incompatible = config_changes(old, cfg.model_dump(mode="json"))
    if incompatible:
        raise UserError(
            f"output_dir {out} holds a run made with another config ({'; '.join(incompatible)}); "
            "choose a new output_dir, or set overwrite=true to start that run afresh"
        )
    return compatible


def _resume_notes(cfg: Config, out: Path) -> list[str]:
    """One line per compatible change of the run being resumed."""
    lines = []
    for change in check_config_changes(cfg, out):
        if change.split(" ", 1)[0] in ("output_dir", "overwrite", "checkpoint.resume"):
            continue  # where the run is and how it was found: nothing about the run itself
        note = ""
        if change.startswith(("train.max_steps", "train.num_epochs")):
            note = " (the learning-rate decay is stretched over the new length"
            note += ", and so is the warmup, set as train.warmup_ratio)" if cfg.train.warmup_ratio else ")"
        lines.append(f"resuming {out} with {change}{note}")
    return lines


def write_run_state(run: RunDir, step: int, finished: bool) -> None:
    """run_state.json: the last step and whether the run finished (false: a signal stopped it)."""
    if run.main:
        (run.path / "run_state.json").write_text(json.dumps({"step": step, "finished": finished}))
