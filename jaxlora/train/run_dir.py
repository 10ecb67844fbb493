"""The run folder (`output_dir`): resume a run or start clean, and never overwrite a run unless asked.

What a run leaves there: config.yaml (the resolved config), checkpoints/, metrics.jsonl, tensorboard/,
adapter/ and run_state.json. With several processes, every process decides whether to resume before
process 0 cleans anything; then only process 0 writes here, except checkpoints/, which all processes
write together (see `jaxlora.train.checkpoint`).
"""

import dataclasses
import json
import shutil
from pathlib import Path

from jaxlora.config import Config, save_config
from jaxlora.errors import UserError
from jaxlora.parallel import Plan

RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "adapter", "config.yaml")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """An opened run folder."""

    path: Path
    resuming: bool  # its latest checkpoint is picked up
    main: bool  # this process writes the run's files (process 0)


def open_run(cfg: Config, resume: bool, plan: Plan) -> RunDir:
    """Claim `cfg.output_dir` for this run: decide whether to resume, clean a run being overwritten and
    save config.yaml. Raises UserError for a folder that holds something else (unless `overwrite`)."""
    resuming = prepare_output_dir(cfg, resume, clean=False)  # every process decides before anyone cleans
    plan.barrier("jaxlora-output-dir-read")
    if plan.is_main:
        prepare_output_dir(cfg, resume)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    plan.barrier("jaxlora-output-dir-ready")
    return RunDir(Path(cfg.output_dir), resuming, plan.is_main)


def prepare_output_dir(cfg: Config, resume_flag: bool = False, *, clean: bool = True) -> bool:
    """Create `output_dir`, decide whether to resume; never overwrite a run unless asked. Returns resume.

    With `clean=False` it only decides (and raises), touching nothing: what processes other than 0 do.
    """
    out = Path(cfg.output_dir)
    mode = "always" if resume_flag else cfg.checkpoint.resume
    ckpt = out / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    if mode == "always" and not has_ckpt:
        raise UserError(f"nothing to resume: {ckpt} has no checkpoint (checkpoint.resume is 'always')")
    if has_ckpt and mode != "never":
        return True
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"output_dir {out} is not empty and holds no run to resume; choose a new output_dir "
                "or set overwrite=true"
            )
        if not clean:
            return False
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if clean:
        out.mkdir(parents=True, exist_ok=True)
    return False


def write_run_state(run: RunDir, step: int, finished: bool) -> None:
    """run_state.json: the last step and whether the run finished (false: a signal stopped it)."""
    if run.main:
        (run.path / "run_state.json").write_text(json.dumps({"step": step, "finished": finished}))
