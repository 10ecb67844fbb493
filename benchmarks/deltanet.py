"""Gated DeltaNet speed: the step time (forward + backward) of jaxlora's chunked scan
(`jaxlora.models.deltanet.chunk_gated_delta_rule`) against transformers' reference path
(`torch_chunk_gated_delta_rule`, what Qwen3.5 runs without flash-linear-attention) on the same inputs,
side by side in one process.

    python benchmarks/deltanet.py --out benchmarks/results/cpu-deltanet.json
    python benchmarks/deltanet.py --tokens 128 --repeats 1                     # a smoke run

Inputs are random float32 q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g (<= 0) and beta [B, T, Hv], with the
l2 norm of q and k inside the rule, as the layer calls it. The step is the rule's output and final state
dotted with fixed random cotangents, differentiated with respect to q, k, v, g and beta (jaxlora: one
jitted `jax.grad`, with its default per-chunk remat, and with `remat_chunks=False`, the within-chunk work
batched over all chunks; transformers: the call and `backward()`); the forward rows time the rule alone.
Each row gets one untimed warm-up call (compilation), then the repeats are interleaved (one call of each row
per round) and each row reports the median wall time. The JSON (`--out`) holds the command, the settings, the
device and versions, the load average before and after, and per row every repeat's seconds, the median and
the first call's time; `speedup` is transformers' median step over jaxlora's.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROWS = (
    "jaxlora step",
    "jaxlora step, batched chunks",
    "transformers step",
    "jaxlora forward",
    "transformers forward",
)
SETTINGS = ("batch", "tokens", "k_heads", "v_heads", "head_dim", "chunk", "repeats")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--tokens", type=int, default=1024, help="T")
    p.add_argument("--k-heads", type=int, default=2, help="Hk")
    p.add_argument("--v-heads", type=int, default=4, help="Hv")
    p.add_argument("--head-dim", type=int, default=64, help="Dk = Dv")
    p.add_argument("--chunk", type=int, default=64, help="the chunk length of both")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each row (median reported)")
    p.add_argument("--out", help="write the JSON report here")
    return p.parse_args(argv)


def make_inputs(a):
    """q, k, v, g, beta and the cotangents of the output and the final state, as numpy float32."""
    import numpy as np

    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    b, t, hk, hv, d = a.batch, a.tokens, a.k_heads, a.v_heads, a.head_dim
    g = (-np.logaddexp(0, f(b, t, hv)) * 0.5).astype(np.float32)
    beta = (1 / (1 + np.exp(-f(b, t, hv)))).astype(np.float32)
    return (f(b, t, hk, d), f(b, t, hk, d), f(b, t, hv, d), g, beta), (f(b, t, hv, d), f(b, hv, d, d))


def jaxlora_calls(inputs, cotangents, chunk: int, remat_chunks: bool = True):
    """(step, forward): functions of no argument that run to completion."""
    import jax
    import jax.numpy as jnp

    from jaxlora.models.deltanet import chunk_gated_delta_rule

    args = [jnp.asarray(x) for x in inputs]
    d_out, d_state = (jnp.asarray(x) for x in cotangents)
    rule = lambda *a: chunk_gated_delta_rule(*a, chunk, use_qk_l2norm=True, remat_chunks=remat_chunks)  # noqa: E731

    def loss(*a):
        out, state = rule(*a)
        return jnp.sum(out * d_out) + jnp.sum(state * d_state)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    forward = jax.jit(rule)
    return lambda: jax.block_until_ready(step(*args)), lambda: jax.block_until_ready(forward(*args))


def transformers_calls(inputs, cotangents, chunk: int):
    """The same with transformers' `torch_chunk_gated_delta_rule` and autograd."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    d_out, d_state = (torch.tensor(x) for x in cotangents)
    rep = inputs[2].shape[2] // inputs[0].shape[2]

    def run(grad: bool):
        leaves = [torch.tensor(x, requires_grad=grad) for x in inputs]
        with torch.set_grad_enabled(grad):  # q, k repeated to the value heads as the layer does in 5.17
            q, k = (x.repeat_interleave(rep, dim=2) for x in leaves[:2])
            out, state = torch_chunk_gated_delta_rule(
                q, k, *leaves[2:], chunk_size=chunk, output_final_state=True, use_qk_l2norm_in_kernel=True
            )
            if grad:
                ((out * d_out).sum() + (state * d_state).sum()).backward()

    return lambda: run(True), lambda: run(False)


def measure(calls: dict, repeats: int, log) -> dict:
    """One warm-up call of each row, then `repeats` rounds of one call each; seconds per row."""

    def timed(call):
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    results = {name: {"first_call_s": timed(call), "repeats_s": []} for name, call in calls.items()}
    for i in range(repeats):
        for name, call in calls.items():
            results[name]["repeats_s"].append(timed(call))
        log(f"round {i + 1}: " + ", ".join(f"{n} {r['repeats_s'][-1]:.3g}s" for n, r in results.items()))
    for r in results.values():
        r["median_s"] = statistics.median(r["repeats_s"])
    return results


def environment() -> dict:
    import importlib.metadata as md

    import jax
    import torch

    versions = {n: md.version(n) for n in ("jax", "jaxlib", "torch", "transformers")}
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{dev.device_kind}",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def table(report: dict) -> str:
    s = report["settings"]
    head = f"{'row':30s} {'median ms':>10s} {'first s':>8s}  repeats ms"
    lines = [
        f"gated delta rule: B={s['batch']} T={s['tokens']} Hk={s['k_heads']} Hv={s['v_heads']} "
        f"D={s['head_dim']} chunk={s['chunk']}, float32, on {report['device']}",
        head,
        "-" * len(head),
    ]
    for name, r in report["results"].items():
        reps = " ".join(f"{x * 1e3:.1f}" for x in r["repeats_s"])
        lines.append(f"{name:30s} {r['median_s'] * 1e3:10.1f} {r['first_call_s']:8.2f}  {reps}")
    speedup = report["speedup"]
    lines.append(f"step, jaxlora vs transformers: {speedup:.2f}x (transformers median / jaxlora median)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.v_heads % args.k_heads:
        raise SystemExit("--v-heads must be a multiple of --k-heads")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    inputs, cotangents = make_inputs(args)
    jax_step, jax_forward = jaxlora_calls(inputs, cotangents, args.chunk)
    jax_batched_step, _ = jaxlora_calls(inputs, cotangents, args.chunk, remat_chunks=False)
    torch_step, torch_forward = transformers_calls(inputs, cotangents, args.chunk)
    steps = (jax_step, jax_batched_step, torch_step, jax_forward, torch_forward)
    calls = dict(zip(ROWS, steps, strict=True))
    results = measure(calls, args.repeats, log)
    report = {
        "command": " ".join(["python", "benchmarks/deltanet.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: getattr(args, k) for k in SETTINGS} | {"dtype": "float32", "qk_l2norm": True},
        **environment(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
        "speedup": results["transformers step"]["median_s"] / results["jaxlora step"]["median_s"],
    }
    print(table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
