"""Run several short `train` runs in one process (one JAX start-up) and print their losses as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/parallel_driver.py runs.json

`runs.json` is a list of `{"name", "config": <config dict>, "copy_from"?: dir, "keep_up_to"?: step}`.
With `copy_from`, that run folder is copied to the run's output_dir first, without its checkpoints after
step `keep_up_to` or its logs, so the run resumes from that checkpoint. Each run prints one line
`RESULT {"name", "process", "losses": {step: loss}, "eval": [[step, loss]], "seconds"}`.
An entry `{"name", "plan": <parallel section>, "model": dir, "quant": none|int8|nf4}` trains nothing: it
prints the PartitionSpec of every base and LoRA array under that plan as lists (a mesh axis or null per
dim): `RESULT {"name", "specs": {path: spec}}`.
Used by tests/test_parallel.py (also with several processes joined by jax.distributed).
"""

import json
import shutil
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py


def _copy_run(src: Path, dst: Path, keep_up_to: int) -> None:
    if jax.process_index() == 0:
        shutil.copytree(src, dst)
        for p in (dst / "checkpoints").iterdir():
            if p.name.isdigit() and int(p.name) > keep_up_to:
                shutil.rmtree(p)
        for name in ("metrics.jsonl", "tensorboard", "adapter", "run_state.json"):
            target = dst / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _specs(run: dict) -> dict[str, list]:
    """PartitionSpecs the plan gives each array of the (optionally quantized) base and of a LoRA tree."""
    from jaxlora.config import LoraConfig, ParallelSection
    from jaxlora.lora import init_lora
    from jaxlora.models import load_model
    from jaxlora.parallel import make_plan
    from jaxlora.quant import make_quantizer

    quantizer = (
        None if run["quant"] == "none" else make_quantizer(run["quant"], None, ("lm_head", "embed_tokens"))
    )
    model = load_model(run["model"], quantizer=quantizer)
    plan = make_plan(ParallelSection(**run["plan"]), 8, model.config.num_kv_heads)
    lora = init_lora(model.config, LoraConfig(r=8), jax.random.key(0))
    trees = {"base": plan.param_shardings(model.params), "lora": plan.lora_shardings(lora)}
    flat = jax.tree_util.tree_flatten_with_path(trees)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): [
            list(a) if isinstance(a, tuple) else a for a in s.spec
        ]
        for path, s in flat
    }


def main(spec_path: str) -> None:
    from jaxlora.config import config_from_dict
    from jaxlora.train import train

    for run in json.loads(Path(spec_path).read_text()):
        if "plan" in run:
            print("RESULT " + json.dumps({"name": run["name"], "specs": _specs(run)}), flush=True)
            continue
        if "copy_from" in run:
            _copy_run(Path(run["copy_from"]), Path(run["config"]["output_dir"]), run["keep_up_to"])
        losses: dict[int, float] = {}

        def record(step, metrics, losses=losses):
            losses[step] = metrics["train/loss"]

        t0 = time.perf_counter()
        result = train(config_from_dict(run["config"]), on_step=record)
        line = {
            "name": run["name"],
            "process": jax.process_index(),
            "losses": losses,
            "eval": result.eval_history,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print("RESULT " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
