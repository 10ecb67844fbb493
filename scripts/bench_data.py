"""Benchmark the data pipeline: examples/s tokenized and packed, cold cache and cached.

    python scripts/bench_data.py [--rows 50000] [--seq-len 512] [--batch-size 8] [--num-proc N]
        [--data alpaca_cleaned_1000.json] [--tokenizer DIR] [--workdir DIR]

The Alpaca file is repeated to `--rows` rows in a jsonl file, tokenized into a fresh cache (cold), then
again from the cache; each run then packs and builds every batch of one epoch. Prints a table.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jaxlora.cli.cli_main import cli_main

ASSETS = Path(os.environ.get("JAXLORA_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer worker processes")
    p.add_argument("--data", default=str(ASSETS / "data" / "alpaca_cleaned_1000.json"))
    p.add_argument("--tokenizer", default=str(ASSETS / "models" / "stories260K"))
    p.add_argument("--workdir", default=None, help="folder for the jsonl and cache (default: a temp dir)")
    return p.parse_args(argv)


def _run(label, cfg, tokenizer, args) -> dict:
    from jaxlora.data import BatchLoader, build_datasets

    t0 = time.perf_counter()
    train, _ = build_datasets(cfg, tokenizer, seed=0)
    t1 = time.perf_counter()
    loader = BatchLoader(train, args.batch_size, args.seq_len, seed=0, prefetch=0, drop_last=False)
    batches = sum(1 for _ in loader)
    t2 = time.perf_counter()
    real = int(train.lengths.sum())
    return {
        "run": label,
        "examples": len(train),
        "tokenize_s": t1 - t0,
        "pack_s": t2 - t1,
        "batches": batches,
        "fill": real / (batches * args.batch_size * args.seq_len),
    }


def _table(rows: list[dict], n_rows: int) -> str:
    head = f"{'run':<8}{'examples':>10}{'tokenize s':>12}{'tok ex/s':>11}{'pack s':>9}{'pack ex/s':>11}"
    head += f"{'total ex/s':>12}{'batches':>9}{'fill':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        total = r["tokenize_s"] + r["pack_s"]
        lines.append(
            f"{r['run']:<8}{r['examples']:>10}{r['tokenize_s']:>12.2f}{n_rows / r['tokenize_s']:>11.0f}"
            f"{r['pack_s']:>9.2f}{r['examples'] / r['pack_s']:>11.0f}{n_rows / total:>12.0f}"
            f"{r['batches']:>9}{r['fill']:>7.1%}"
        )
    return "\n".join(lines)


def bench(args) -> list[dict]:
    """Write the repeated data, run cold and cached, return the two result rows."""
    import datasets
    from transformers import AutoTokenizer

    from jaxlora.data.config import DataConfig, DataSource

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"alpaca_{args.rows}.jsonl"
    src = datasets.load_dataset("json", data_files=args.data, split="train", cache_dir=str(work / "hf"))
    reps = -(-args.rows // len(src))
    datasets.concatenate_datasets([src] * reps).select(range(args.rows)).to_json(str(data))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    source = DataSource(path=str(data), format="alpaca")
    cfg = DataConfig(
        train=(source,), validation_split=0.0, seq_len=args.seq_len, truncation=True,
        num_proc=args.num_proc, cache_dir=str(cache),
    )  # fmt: skip
    rows = [_run("cold", cfg, tokenizer, args), _run("cached", cfg, tokenizer, args)]
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return rows


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    rows = bench(args)
    print(f"{args.rows} rows of {Path(args.data).name}, seq_len {args.seq_len}, num_proc {args.num_proc}")
    print(_table(rows, args.rows))
    return 0


if __name__ == "__main__":
    main()
