"""Rollout speed: completion tokens per second of `jaxlora.models.rollout` against transformers' `generate`
on the same model, the same prompts and the same sampling settings, side by side in one process.

    python benchmarks/rollout.py --out benchmarks/results/cpu-rollout.json     # Qwen2.5-0.5B shape, CPU
    python benchmarks/rollout.py --arch tiny --prompts 2 --new-tokens 8        # a smoke run

The model is the architecture of `benchmarks/presets/<arch>/config.json` with random weights (drawn by
transformers, saved once to a temporary folder and loaded by jaxlora from there: the same weights). Both
sample at temperature 1 with top-k and top-p off (`--top-k`, `--top-p` set them) and EOS disabled, so
every row generates exactly `--new-tokens` tokens; the prompts are random token ids, left-padded, their
lengths spread between half of `--prompt-len` and all of it. Rows measured, each after one untimed
warm-up call (compilation):

    jaxlora                   `rollout`: each prompt prefilled once, its cache repeated for the G rows,
                              decoding on per-layer weights and cache (`split_layers`, its CPU default)
    jaxlora scanned layers    the same decoding with the layer scan over the stacked weights (the GPU way)
    jaxlora repeated prefill  `rollout` with G = 1 on the prompts repeated G times (what transformers does)
    transformers              `generate(num_return_sequences=G, do_sample=True)` with its default attention
                              (sdpa), in the model's dtype, on the GPU when there is one

The repeats are interleaved (one call of each row per round) and each row reports the median wall time.
The JSON (`--out`) holds the command, the settings, the device and versions, the machine's load average
before and after, and per row every repeat's wall and process CPU seconds (both engines use every core:
on a busy machine the CPU seconds compare better), the median, the completion tokens/s and the first
call's time; `speedup` is transformers' median over jaxlora's, `cpu_speedup` the same in CPU seconds.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
ROWS = ("jaxlora", "jaxlora scanned layers", "jaxlora repeated prefill", "transformers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen2.5-0.5b", help="a folder of benchmarks/presets/")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prompts", type=int, default=8, help="P, prompts per batch")
    p.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
    p.add_argument("--prompt-len", type=int, default=64, help="the longest prompt (tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per completion")
    p.add_argument("--top-k", type=int, default=0, help="sampling's top-k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling's top-p (1: off)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each row (median reported)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--out", help="write the JSON report here")
    return p.parse_args(argv)


def make_models(arch: str, dtype: str, folder: str):
    """(torch model, jaxlora Model) of the preset's architecture with the same random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxlora.models import load_model

    config = AutoConfig.from_pretrained(PRESETS_DIR / arch)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # drawn where it runs
        hf = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))  # its default attention
    hf.save_pretrained(folder)
    return hf.eval(), load_model(folder, dtype=dtype)


def make_prompts(p: int, length: int, vocab: int, seed: int = 0):
    """Random left-padded prompts: ids, mask [P, length] int32, row lengths from length/2 to length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.linspace(max(1, length // 2), length, p).astype(int)
    ids = np.zeros((p, length), np.int32)
    mask = np.zeros((p, length), np.int32)
    for i, n in enumerate(lengths):
        ids[i, length - n :] = rng.integers(3, vocab, n)
        mask[i, length - n :] = 1
    return ids, mask


def jaxlora_call(model, ids, mask, g: int, new: int, top: tuple[int, float], repeated: bool, split: bool):
    """A function of a seed running one rollout to completion; returns the completions [P*G, new]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora.models.rollout import rollout

    if repeated:  # the prompts repeated G times, one completion each: G prefills of every prompt
        ids, mask, g = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0), 1
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def call(seed: int):
        out = rollout(
            model.params, model.config, None, 1.0, ids, mask, jax.random.key(seed),
            num_generations=g, max_new_tokens=new, temperature=1.0, top_k=top[0], top_p=top[1], eos_ids=(),
            split_layers=split,
        )  # fmt: skip
        return np.asarray(out.completions)

    return call


def transformers_call(hf, ids, mask, g: int, new: int, top: tuple[int, float]):
    """The same with transformers' `generate` (EOS off: no eos_token_id, every row runs `new` tokens)."""
    import torch
    from transformers import GenerationConfig

    dev = next(hf.parameters()).device
    ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
    mask_t = torch.tensor(mask, device=dev)
    gen = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=top[0], top_p=top[1], max_new_tokens=new,
        num_return_sequences=g, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    hf.generation_config.eos_token_id = None  # no fallback to the model's own EOS

    def call(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, generation_config=gen)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1] :].cpu().numpy()

    return call


def timed(call, seed: int, want: tuple[int, int]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = call(seed)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out.shape != want:
        raise SystemExit(f"expected completions of shape {want}, got {out.shape}")
    return seconds, cpu


def measure(calls: dict, repeats: int, want, log) -> dict:
    """One warm-up call of each row, then `repeats` rounds of one call each; seconds per row. `want`: the
    output shape [B, N] of every row, or a dict of it per row."""
    want = want if isinstance(want, dict) else dict.fromkeys(calls, want)
    results = {name: {"first_call_s": timed(call, 0, want[name])[0], "repeats_s": [], "repeats_cpu_s": []}
               for name, call in calls.items()}  # fmt: skip
    log("warm-up: " + ", ".join(f"{n} {r['first_call_s']:.3g}s" for n, r in results.items()))
    for i in range(repeats):
        for name, call in calls.items():
            wall, cpu = timed(call, i + 1, want[name])
            results[name]["repeats_s"].append(wall)
            results[name]["repeats_cpu_s"].append(cpu)
        log(f"round {i + 1}: " + ", ".join(f"{n} {r['repeats_s'][-1]:.3g}s" for n, r in results.items()))
    for name, r in results.items():
        r["median_s"] = statistics.median(r["repeats_s"])
        r["median_cpu_s"] = statistics.median(r["repeats_cpu_s"])
        r["completion_tokens_per_s"] = want[name][0] * want[name][1] / r["median_s"]
    return results


def environment() -> dict:
    import importlib.metadata as md

    import jax

    versions = {n: md.version(n) for n in ("jax", "jaxlib", "torch", "transformers")}
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{dev.device_kind}", "cpus": os.cpu_count(), "versions": versions}


def table(report: dict) -> str:
    s = report["settings"]
    head = f"{'row':26s} {'tokens/s':>9s} {'median s':>9s} {'first s':>8s}  repeats s"
    lines = [
        f"rollout: {s['arch']} {s['dtype']}, {s['prompts']} prompts x G={s['generations']}, prompts up to "
        f"{s['prompt_len']} tokens, {s['new_tokens']} new tokens, on {report['device']}",
        head,
        "-" * len(head),
    ]
    for name, r in report["results"].items():
        reps = " ".join(f"{x:.3g}" for x in r["repeats_s"])
        speed, median, first = r["completion_tokens_per_s"], r["median_s"], r["first_call_s"]
        lines.append(f"{name:26s} {speed:9.1f} {median:9.3g} {first:8.1f}  {reps}")
    if "speedup" in report:
        lines.append(
            f"jaxlora vs transformers: {report['speedup']:.2f}x (transformers median / jaxlora median), "
            f"{report['cpu_speedup']:.2f}x in CPU seconds"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := sorted(set(rows) - set(ROWS)):
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        hf, model = make_models(args.arch, args.dtype, folder)
        ids, mask = make_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
        g, new, top = args.generations, args.new_tokens, (args.top_k, args.top_p)
        calls = {}
        for row in rows:
            if row == "transformers":
                calls[row] = transformers_call(hf, ids, mask, g, new, top)
            else:
                repeated, split = row == "jaxlora repeated prefill", row != "jaxlora scanned layers"
                calls[row] = jaxlora_call(model, ids, mask, g, new, top, repeated, split)
        results = measure(calls, args.repeats, (args.prompts * g, new), log)
    report = report_head("benchmarks/rollout.py", argv, args, mask, load_before, results)
    if "jaxlora" in results and "transformers" in results:
        report["speedup"] = results["transformers"]["median_s"] / results["jaxlora"]["median_s"]
        report["cpu_speedup"] = results["transformers"]["median_cpu_s"] / results["jaxlora"]["median_cpu_s"]
    print(table(report))
    save(report, args.out)
    return 0


def report_head(script: str, argv, args, mask, load_before, results: dict) -> dict:
    """The JSON report's common part: the command, the settings (prompt mask [P, Tp]), the machine, its
    load average before (`os.getloadavg()` then) and now, and the rows' `results`."""
    return {
        "command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "arch": args.arch,
            "dtype": args.dtype,
            "prompts": args.prompts,
            "generations": args.generations,
            "prompt_len": args.prompt_len,
            "prompt_lengths": mask.sum(axis=1).tolist(),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "sampling": {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p, "eos": None},
        },
        **environment(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }


def save(report: dict, out: str | None) -> None:
    """Write the JSON report to `out` (its folder made as needed); nothing without one."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    # JAX and PyTorch share the GPU in this process: JAX must not take 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
