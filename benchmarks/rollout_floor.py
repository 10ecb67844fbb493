"""How fast a rollout could be on this machine: the decode's matrix products alone, beside the real rollout
and transformers' `generate`, in one process.

    python benchmarks/rollout_floor.py --out benchmarks/results/cpu-rollout-floor.json
    python benchmarks/rollout_floor.py --arch tiny --prompts 2 --new-tokens 8 --repeats 1   # a smoke run

`benchmarks/rollout.py` compares whole rollouts. This script asks how much faster any engine could be
whose matrix products run on XLA's dot: the floor is the prefill (a rollout of one new token) plus the
decode's products alone, N - 1 steps of every layer's weight matrices and the vocabulary projection on
B = P * G rows, in one compiled loop, with nothing else (no attention, norms or sampling; each product's
output is summed into the next step's input, so none is hoisted or dropped). Rows, each after one
untimed warm-up call, repeats interleaved, medians reported:

    jaxlora                 `rollout` as `benchmarks/rollout.py` runs it (per-layer weights on a CPU)
    jaxlora prefill         the same with one new token: the prefill and one draw
    decode products         the N - 1 decode steps' products alone, on per-layer copies of the weights
    transformers            `generate(num_return_sequences=G, do_sample=True)`

`ceiling` is transformers' median over (prefill + decode products): the speedup an engine would reach
with no work besides those products on this machine. `speedup` is transformers over jaxlora, and
`share_of_ceiling` their ratio.
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import rollout as bench  # noqa: E402


def products_call(model, rows: int, steps: int):
    """A function of a seed running `steps` decode steps of matrix products only on [rows, D] inputs;
    returns a [rows, 1] array (the shapes check in `measure` is per row)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora.models.decoder import logits_from_hidden

    cfg, params = model.config, model.params
    d = cfg.hidden_size
    layers = [
        [w for w in jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], params["layers"])) if w.ndim == 2]
        for i in range(cfg.num_layers)
    ]  # each layer's weight matrices [K, N] as arrays of their own, as the CPU rollout holds them

    @jax.jit
    def run(layers, params, x):  # x [rows, D]
        def body(_, x):
            acc = jnp.zeros((x.shape[0], 1), jnp.float32)
            for mats in layers:
                for w in mats:
                    k = w.shape[0]
                    inp = jnp.tile(x, (1, -(-k // d)))[:, :k].astype(w.dtype)  # [rows, K]
                    acc = acc + jnp.sum(inp @ w, axis=-1, keepdims=True, dtype=jnp.float32)
            logits = logits_from_hidden(params, cfg, x)  # [rows, V] float32
            acc = acc + jnp.sum(logits, axis=-1, keepdims=True)
            return x + (1e-9 * acc).astype(x.dtype)

        return jax.lax.fori_loop(0, steps, body, x)[:, :1]

    dt = jnp.dtype(cfg.runtime.compute_dtype)

    def call(seed: int):
        x = jax.random.normal(jax.random.key(seed), (rows, d), dt)
        return np.asarray(run(layers, params, x))

    return call


def main(argv=None) -> int:
    args = bench.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    g, new, top = args.generations, args.new_tokens, (args.top_k, args.top_p)
    b = args.prompts * g
    want = {"jaxlora": (b, new), "jaxlora prefill": (b, 1), "decode products": (b, 1), "transformers": None}
    want["transformers"] = want["jaxlora"]
    with tempfile.TemporaryDirectory() as folder:
        hf, model = bench.make_models(args.arch, args.dtype, folder)
        ids, mask = bench.make_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
        calls = {
            "jaxlora": bench.jaxlora_call(model, ids, mask, g, new, top, False, True),
            "jaxlora prefill": bench.jaxlora_call(model, ids, mask, g, 1, top, False, True),
            "decode products": products_call(model, b, new - 1),
            "transformers": bench.transformers_call(hf, ids, mask, g, new, top),
        }
        results = bench.measure(calls, args.repeats, want, log)
    med = {name: r["median_s"] for name, r in results.items()}
    floor = med["jaxlora prefill"] + med["decode products"]
    report = bench.report_head("benchmarks/rollout_floor.py", argv, args, mask, load_before, results) | {
        "floor_s": floor,
        "ceiling": med["transformers"] / floor,
        "speedup": med["transformers"] / med["jaxlora"],
    }
    report["share_of_ceiling"] = report["speedup"] / report["ceiling"]
    for name, s in med.items():
        print(f"{name:18s} {s:8.3f} s")
    print(
        f"floor (prefill + decode products) {floor:.3f} s; ceiling {report['ceiling']:.2f}x transformers; "
        f"jaxlora {report['speedup']:.2f}x ({report['share_of_ceiling']:.0%} of the ceiling)"
    )
    bench.save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
