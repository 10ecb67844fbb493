"""Memory, compile time and wall time of the `xla` attention kernel (`causal_attention`), old against new.

    python benchmarks/attention_memory.py [--old-rev REV] [--repeats 7] [--out PATH]

The old kernel is `jaxlora/models/attention/blocked.py` as of `--old-rev` (default: the last commit of the
per-query-block kernel, whose blocks grow with T), read with `git show` and imported from a temporary
file; the new one is this checkout's. Everything is one attention forward + backward (value and gradient
of sum(out * cotangent) with respect to q, k and v), compiled by `jax.jit` for this machine's backend:

- temp: XLA's temporary bytes (`compile().memory_analysis().temp_size_in_bytes`) at Llama-3.1-8B's head
  shapes (B=1, N=32, K=8, H=128, bfloat16), T = 2048 .. 32768, without and with a Gemma-2-like window
  (4096) and soft-cap (50); with the growth per doubling of T and the compile time;
- wall: milliseconds per forward + backward, float32, old and new interleaved in one process (each repeat
  times about `--budget` seconds of calls of each in turn; the median repeat is reported), at the
  stories260K shape (alone, and per layer inside a `lax.scan` over 5 layers as the decoder runs it) and at
  T=2048 with Llama-like small heads (with and without a window of 512);
- plan: the whole Llama-3.1-8B LoRA train step's activations (`jaxlora plan`: XLA temp, int8 base, remat
  full, B=1) at the same T, `model.attention=xla` running the old or the new kernel;
- step: the wall time, for the whole stories260K LoRA loss and gradient (B=8, T=256, remat lean, layers under
  scan) with `model.attention=xla` running the old or the new kernel (skipped without `--stories`' model).

Prints a table and writes the JSON report (with the command) to `--out`.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlora.models.attention import blocked as new  # noqa: E402

OLD_REV = "b819efdb54d02b343ca6af4457d4b3338803f687"  # the last commit of the growing-block kernel
KERNEL = "jaxlora/models/attention/blocked.py"
LLAMA = dict(b=1, n=32, kh=8, h=128)  # Llama-3.1-8B's attention heads
MEMORY_T = (2048, 4096, 8192, 16384, 32768)
# The window is a traced int32 (per layer), so it is an argument of the compiled program, not part of it:
# the Gemma-2-like row differs by its soft-cap; the window changes which tiles run, not what is allocated.
MEMORY_CASES = {"causal": 0.0, "window 4096 + softcap 50": 50.0}
PLAN = [  # `jaxlora plan` of the whole train step: Llama-3.1-8B's config.json, int8 base, remat full, B=1
    f"--config={ROOT / 'configs/llama-3.1-8b-int8.yaml'}",
    f"model.path={ROOT / 'benchmarks/presets/llama-3.1-8b'}",
    "model.attention=xla",
    "train.batch_size=1",
    "train.grad_accum_steps=1",
    "train.remat=full",
]
WALL_CASES = {  # name: (B, T, N, K, H, window, layers): layers > 0 runs in a scan over layers, per layer
    "stories260K B=8 T=256": (8, 256, 8, 4, 8, 0, 0),
    "stories260K B=8 T=256, 5-layer scan": (8, 256, 8, 4, 8, 0, 5),
    "small heads B=1 T=2048": (1, 2048, 8, 2, 64, 0, 0),
    "small heads B=1 T=2048 window 512": (1, 2048, 8, 2, 64, 512, 0),
}


def load_old(rev: str):
    """The kernel module as of `rev`, imported from a temporary file."""
    text = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True)
    path = Path(tempfile.mkdtemp()) / "old_blocked.py"
    path.write_bytes(text.stdout)
    spec = importlib.util.spec_from_file_location("old_blocked", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fwd_and_grad(kernel, t: int, softcap: float):
    """(q, k, v, positions, segment_ids, window[, cot]) -> (sum(out * cot), (dq, dk, dv)) at the kernel's
    own block for T tokens; cot (the output's cotangent) defaults to ones."""

    def fn(q, k, v, pos, seg, window, cot=1.0):
        def loss(q, k, v):
            out = kernel.causal_attention(q, k, v, pos, seg, window, kernel.attention_block_size(t), softcap)
            return jnp.sum(out.astype(jnp.float32) * cot)

        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    return fn


def temp_and_compile(kernel, t: int, softcap: float) -> tuple[int, float]:
    """(XLA temp bytes, lower + compile seconds) of one forward + backward at Llama-3.1-8B head shapes."""
    b, n, kh, h = LLAMA["b"], LLAMA["n"], LLAMA["kh"], LLAMA["h"]
    sd = jax.ShapeDtypeStruct
    bf16, i32 = jnp.bfloat16, jnp.int32
    args = (sd((b, t, n, h), bf16), sd((b, t, kh, h), bf16), sd((b, t, kh, h), bf16))
    args += (sd((b, t), i32), sd((b, t), i32), sd((), i32))
    start = time.perf_counter()
    compiled = jax.jit(fwd_and_grad(kernel, t, softcap)).lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis().temp_size_in_bytes, seconds


def growth_table(label: str, measure, kernels: dict, unit: int, unit_name: str) -> list[dict]:
    """Per T in MEMORY_T: `measure(kernel, t)` -> (bytes, compile seconds) of each kernel, with the growth
    of bytes over the previous T's; printed as a table (bytes in `unit_name`) and returned as rows."""
    rows, prev = [], None
    head = "".join(f" {name + ' ' + unit_name:>10s} {'x':>5s} {'compile':>7s}" for name in kernels)
    print(f"{label:26s} {'T':>6s}{head}")
    for t in MEMORY_T:
        row = {"t": t}
        for name, kernel in kernels.items():
            row[f"{name}_bytes"], row[f"{name}_compile_s"] = measure(kernel, t)
            row[f"{name}_growth"] = row[f"{name}_bytes"] / prev[f"{name}_bytes"] if prev else None
        rows.append(prev := row)
        cells = [f"{label:26s} {t:6d}"]
        for name in kernels:
            size, growth = row[f"{name}_bytes"] / unit, row[f"{name}_growth"] or 0
            cells.append(f"{size:10.2f} {growth:5.2f} {row[f'{name}_compile_s']:6.1f}s")
        print(" ".join(cells), flush=True)
    return rows


def memory_table(old) -> list[dict]:
    """XLA temp bytes and compile seconds of one forward + backward, old and new, per case and T."""
    rows = []
    for case, softcap in MEMORY_CASES.items():
        measure = lambda kernel, t, c=softcap: temp_and_compile(kernel, t, c)  # noqa: E731
        rows += [
            {"case": case, **r} for r in growth_table(case, measure, {"old": old, "new": new}, 2**20, "MiB")
        ]
    return rows


def timer(kernel, b, t, n, kh, h, window, layers=0):
    """A function(iters) -> seconds per forward + backward, float32 random inputs, compiled and warm.

    Everything is an argument of the jitted function (nothing for XLA to fold). layers > 0: the calls run
    in a `lax.scan` over that many layers with a traced window each, as the decoder runs them, and the
    time is per layer.
    """
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kh, kh))
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    args = (q, k, v, pos, jnp.ones((b, t), jnp.int32), jnp.full((max(layers, 1),), window, jnp.int32), cot)
    one = fwd_and_grad(kernel, t, 0.0)

    def scanned(q, k, v, pos, seg, windows, cot):
        return jax.lax.scan(lambda c, w: (c, one(q, k, v, pos, seg, w, cot)), 0, windows)[1]

    def alone(q, k, v, pos, seg, windows, cot):
        return one(q, k, v, pos, seg, windows[0], cot)

    step = jax.jit(scanned if layers else alone)
    jax.block_until_ready(step(*args))

    def run(iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            result = step(*args)
        jax.block_until_ready(result)
        return (time.perf_counter() - start) / iters / max(layers, 1)

    return run


def wall_row(case: str, runs: dict, repeats: int, budget_s: float, **extra) -> dict:
    """Time `runs` (old, new) interleaved; print and return the row: median ms of each and old/new."""
    times, iters = interleaved(runs, repeats, budget_s)
    row = {"case": case, **extra, "iters": iters}
    for name, ts in times.items():
        row[f"{name}_ms"], row[f"{name}_all_ms"] = statistics.median(ts) * 1e3, [x * 1e3 for x in ts]
    row["speedup"] = row["old_ms"] / row["new_ms"]
    ms = f"{row['old_ms']:8.2f} {row['new_ms']:8.2f} {row['speedup']:7.2f}x"
    print(f"{case:40s} {ms}  ({repeats} repeats x {iters} calls)", flush=True)
    return row


def wall_table(old, repeats: int, budget_s: float, stories: Path) -> list[dict]:
    print(f"{'case':40s} {'old ms':>8s} {'new ms':>8s} {'old/new':>8s}")
    rows = []
    for case, shape in WALL_CASES.items():
        runs = {"old": timer(old, *shape), "new": timer(new, *shape)}
        rows.append(wall_row(case, runs, repeats, budget_s, shape_b_t_n_k_h_window_layers=shape))
    if (stories / "config.json").exists():
        runs = {"old": step_timer(old, stories), "new": step_timer(new, stories)}
        rows.append(wall_row("stories260K LoRA loss+grad B=8 T=256", runs, repeats, budget_s))
    else:
        print(f"no {stories}: the stories260K step is not measured")
    return rows


def step_timer(kernel, model_dir: Path):
    """A function(iters) -> seconds per stories260K LoRA loss + gradient, `attend` running `kernel`."""
    from jaxlora.lora import LoraConfig, init_lora, lora_scale
    from jaxlora.models import load_model
    from jaxlora.train.step import StepSpec, loss_and_count

    model = load_model(model_dir)
    lora_cfg = LoraConfig(r=8, alpha=16.0, dropout=0.0, target_modules="all-linear")
    lora = init_lora(model.config, lora_cfg, jax.random.key(1))
    b, t = 8, 256
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "positions": pos, "segment_ids": pos * 0 + 1}
    scale, spec = jnp.asarray(lora_scale(model.config, lora_cfg)), StepSpec(model.config, 0.0, 1024)
    with swapped_kernel(kernel):  # `attend` reads the names at trace time: trace and compile now
        step = jax.jit(
            jax.value_and_grad(lambda lo: _mean(loss_and_count(lo, model.params, batch, scale, None, spec)))
        )
        jax.block_until_ready(step(lora))

    def run(iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            result = step(lora)
        jax.block_until_ready(result)
        return (time.perf_counter() - start) / iters

    return run


def _mean(sum_and_count):
    total, count = sum_and_count
    return total / count


def interleaved(runs: dict, repeats: int, budget_s: float) -> tuple[dict, int]:
    """{name: [seconds per call of each repeat]} with runs timed in turn, and the calls per repeat."""
    iters = max(1, int(budget_s / max(run(1) for run in runs.values())))
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved: old, new, old, new, ...
        for name, run in runs.items():
            times[name].append(run(iters))
    return times, iters


@contextlib.contextmanager
def swapped_kernel(kernel):
    """Inside: `attend` (`model.attention=xla`) runs `kernel`'s `causal_attention` and block size."""
    import jaxlora.models.attention as attention

    names = ("causal_attention", "attention_block_size")
    saved = [getattr(attention, name) for name in names]
    for name in names:
        setattr(attention, name, getattr(kernel, name))
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(attention, name, value)


def plan_activations(kernel, t: int) -> tuple[int, float]:
    """(`jaxlora plan`'s activations: the whole train step's XLA temp bytes, its compile seconds) of PLAN."""
    from jaxlora.cli.plan import plan_main

    out = io.StringIO()
    with swapped_kernel(kernel), contextlib.redirect_stdout(out):
        plan_main([*PLAN, f"data.seq_len={t}", "--json", "--memory-gib=100000"])
    plan = json.loads(out.getvalue())
    return plan["memory"]["activations"], plan["compile_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old kernel")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per timed repeat (sets iters)")
    parser.add_argument("--stories", default=str(ROOT.parent / "shared/assets/models/stories260K"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-attention-memory.json"))
    args = parser.parse_args(argv)
    old = load_old(args.old_rev)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; old kernel = {args.old_rev}")
    print("temp bytes of one forward + backward, B=1 N=32 K=8 H=128 bfloat16:")
    memory = memory_table(old)
    print("activations of the whole Llama-3.1-8B LoRA step (jaxlora plan, int8 base, remat full, B=1):")
    step = growth_table("Llama-3.1-8B step", plan_activations, {"old": old, "new": new}, 2**30, "GiB")
    print("wall time of one forward + backward, float32, interleaved, median repeat:")
    wall = wall_table(old, args.repeats, args.budget, Path(args.stories))
    report = {
        "command": " ".join(
            ["python benchmarks/attention_memory.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "old_rev": args.old_rev,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "block_sizes": {str(t): new.attention_block_size(t) for t in (256, 2048, *MEMORY_T)},
        "memory": memory,
        "plan_llama_3_1_8b": step,
        "wall": wall,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
