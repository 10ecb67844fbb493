"""Run several short `train` runs in one process (one JAX start-up) and print their losses as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/helpers/parallel_driver.py runs.json

`runs.json` is a list of `{"name", "config": <config dict>, "copy_from"?: dir, "keep_up_to"?: step}`.
With `copy_from`, that run folder is copied to the run's output_dir first, without its checkpoints after
step `keep_up_to` or its logs, so the run resumes from that checkpoint. Each run prints one line
`RESULT {"name", "process", "losses": {step: loss}, "eval": [[step, loss]], "seconds"}`.
An entry `{"name", "plan": <parallel section>, "model": dir, "quant": none|int8|nf4}` trains nothing: it
prints the PartitionSpec of every base and LoRA array under that plan as lists (a mesh axis or null per
dim): `RESULT {"name", "specs": {path: spec}}`.
An entry `{"name", "moe": dir, "mesh": {"expert": 4, ...}, "steps", "quant"?, "impl"?}` trains a MoE model's
attention and expert LoRA with the train step on a fixed batch (`moe_losses`; no run folder, as the run
config has no expert axis yet): `RESULT {"name", "losses": {step: loss}}`.
Used by tests/test_parallel.py and tests/test_moe.py (also with several processes joined by jax.distributed).
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


MOE_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def moe_losses(folder, steps: int, mesh: dict | None = None, quant: str = "none", impl: str = "auto") -> list:
    """Losses of `steps` train steps (AdamW 1e-2) of LoRA r=4 on q/v/o and both expert weights of the MoE
    model in `folder`, on one fixed batch of 8 rows of 16 tokens, under a mesh of the given axis sizes
    (none: one device)."""
    import types

    import numpy as np
    import optax

    from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
    from jaxlora.models import load_model
    from jaxlora.parallel import make_plan
    from jaxlora.quant import make_quantizer
    from jaxlora.train.step import StepSpec, make_eval_step, make_train_step

    model = load_model(folder, quantizer=make_quantizer(quant))
    cfg = model.config.with_runtime(moe_impl=impl)
    sizes = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, **(mesh or {})}
    strategy = "mesh" if mesh else "single"
    plan = make_plan(
        types.SimpleNamespace(strategy=strategy, mesh=types.SimpleNamespace(**sizes)),
        8,
        cfg.num_kv_heads,
        num_experts=cfg.num_experts,
    )
    lc = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=("q_proj", "v_proj", "o_proj"),
        target_parameters=MOE_TARGETS,
    )
    spec = StepSpec(cfg, aux_loss_coef=cfg.router_aux_loss_coef)
    opt = optax.adamw(1e-2)
    base = plan.place_base(model.params)
    lora, opt_state = plan.place_train_state(Adapter.split(init_lora(cfg, lc, jax.random.key(0))), opt.init)
    step, _ = plan.compile_steps(make_train_step(spec, opt), make_eval_step(spec), base, lora, opt_state)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(1, 8, 17)).astype(np.int32)
    batch = plan.put_batch(
        {
            "input_ids": ids[..., :-1],
            "targets": ids[..., 1:],
            "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 8, 16)).copy(),
            "segment_ids": np.ones((1, 8, 16), np.int32),
        }
    )
    scale = plan.replicate(np.asarray(lora_scale(cfg, lc)))
    losses = []
    for i in range(steps):
        lora, opt_state, metrics = step(
            lora, opt_state, base, batch, plan.replicate(jax.random.key(i)), scale
        )
        losses.append(float(metrics["loss"]))
    return losses


def main(spec_path: str) -> None:
    from jaxlora.config import config_from_dict
    from jaxlora.train import train

    for run in json.loads(Path(spec_path).read_text()):
        if "plan" in run:
            print("RESULT " + json.dumps({"name": run["name"], "specs": _specs(run)}), flush=True)
            continue
        if "moe" in run:
            args = {k: run[k] for k in ("mesh", "quant", "impl") if k in run}
            losses = moe_losses(run["moe"], run["steps"], **args)
            line = {"name": run["name"], "losses": dict(enumerate(losses, start=1))}
            print("RESULT " + json.dumps(line), flush=True)
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
