"""The `plan` command line (`jaxlora plan`, `scripts/plan.py`): a run's memory per device, from its config
and the model's config.json alone (`jaxlora.train.memory_plan`)."""

import argparse
import json

PLAN_USAGE = """Plan a run's memory per device without reading weights, tokenizer or data.

    jaxlora plan --config configs/X.yaml [section.key=value ...] [--no-compile] [--memory-gib N]
        [--max-seq-len] [--json]

Builds the model from config.json alone (a folder holding only config.json works), counts its parameters
as transformers does and the trainable ones as PEFT does, and compiles the run's train step from abstract
arrays: XLA's bytes per device for weights, adapter, optimizer state and activations, and the peak
(arguments + temp + outputs - aliased). On the CPU the figures are XLA:CPU's.
"""


def plan_args(argv=None):
    p = argparse.ArgumentParser(
        prog="plan", description=PLAN_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML run configuration (as for train)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=4096 train.remat=full")
    p.add_argument(
        "--no-compile", action="store_true", help="count and size the arguments only (no activations)"
    )
    p.add_argument(
        "--memory-gib", type=float, default=None, help="memory per device to fit (default: the device's)"
    )
    p.add_argument(
        "--max-seq-len", action="store_true", help="find the longest data.seq_len that fits (bisection)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def plan_main(argv=None) -> int:
    """Print the plan (text, or one JSON object with `--json`); exit code 0 whether or not it fits."""
    args = plan_args(argv)
    from jaxlora.config import load_config
    from jaxlora.errors import UserError
    from jaxlora.train.memory_plan import longest_seq_len, plan_memory

    if args.max_seq_len and args.no_compile:
        raise UserError("--max-seq-len compiles the step at each length; drop --no-compile")
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise UserError(f"--memory-gib must be positive, got {args.memory_gib}")
    cfg = load_config(args.config, args.overrides)
    if args.max_seq_len:
        report = longest_seq_len(cfg, memory_gib=args.memory_gib)
    else:
        report = plan_memory(cfg, compile_step_too=not args.no_compile, memory_gib=args.memory_gib)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


def _bytes(n: int | None) -> str:
    from jaxlora.quant.tensor import human_bytes

    return "-" if n is None else human_bytes(n)


def format_plan(report: dict) -> str:
    """The plan as a few lines of text."""
    m, r, p, mem = report["model"], report["run"], report["params"], report["memory"]
    share = 100 * p["trainable"] / max(p["total"], 1)
    kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in mem["weights_by_kind"].items())
    lines = [
        f"model: {m['path']} ({m['model_type']}, {m['layers']} layers, {m['dtype']}, quant {m['quant']})",
        f"run: {r['objective']}, batch {r['batch_size']} x {r['grad_accum_steps']} accumulation x seq_len "
        f"{r['seq_len']}, remat {r['remat']}, LoRA r {r['lora_r']}; {r['parallel']}",
        f"parameters: {p['total']:,} total (as transformers counts them), {p['trainable']:,} trainable "
        f"(as PEFT counts them, {share:.4f}%)",
        f"memory per device ({mem['backend']}: {mem['device_kind']}):",
        f"  weights      {_bytes(mem['weights'])} ({kinds})",
        f"  trainable    {_bytes(mem['trainable'])}" + _frozen(mem),
        f"  optimizer    {_bytes(mem['optimizer'])}",
        f"  activations  {_bytes(mem['activations'])} (XLA temp)",
    ]
    if mem["arguments"] is None:
        lines.append(f"  peak         {_bytes(mem['peak'])} or more: the arguments alone (--no-compile)")
    else:
        parts = {k: _bytes(mem[k]) for k in ("arguments", "activations", "outputs", "aliased")}
        lines.append(
            f"  peak         {_bytes(mem['peak'])} = arguments {parts['arguments']} + temp "
            f"{parts['activations']} + outputs {parts['outputs']} - aliased {parts['aliased']}"
        )
        if "rollout" in mem:  # GRPO: the rollout program, run before the step
            ro = {k: _bytes(v) for k, v in mem["rollout"].items()}
            lines.append(
                f"  rollout      {ro['peak_with_optimizer']} = its peak {ro['peak']} (arguments "
                f"{ro['arguments']} + temp {ro['activations']} + outputs {ro['outputs']}) + optimizer"
            )
        lines.append(f"compile: {report['compile_s']:.1f} s")
    where = f"{_bytes(mem['capacity'])} ({mem['capacity_from']})"
    if report["fits"] is None:
        lines.append(f"the arguments fit in {where}; the peak needs the compiled step (drop --no-compile)")
    else:
        lines.append(f"{'fits' if report['fits'] else 'does NOT fit'} in {where}")
    if "max_seq_len" in report:
        lines.append(f"longest data.seq_len that fits: {report['max_seq_len']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _frozen(mem: dict) -> str:
    return f" (+ {_bytes(mem['adapter_frozen'])} frozen adapter leaves)" if mem["adapter_frozen"] else ""
