"""Packing and the batch loader: batch layout, determinism, resume, host sharding, packed-loss parity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxlora.data import BatchLoader, Examples, build_datasets, pack_rows
from jaxlora.data.config import DataConfig, DataSource
from jaxlora.errors import UserError

IGNORE = -100


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def alpaca(assets, tok, tmp_path_factory):
    """alpaca_cleaned_1000 tokenized for seq_len 256 (long examples cut)."""
    src = DataSource(path=str(assets / "data" / "alpaca_cleaned_1000.json"), format="alpaca")
    cfg = DataConfig(
        train=(src,),
        validation_split=0.0,
        seq_len=256,
        truncation=True,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return build_datasets(cfg, tok)[0]


def segments(batch):
    """(row, start, end) of every example in a batch."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            out.append((r, int(idx[0]), int(idx[-1]) + 1))
    return out


def key(ids):
    return tuple(int(x) for x in ids)


def test_packed_batches_hold_every_example_once_with_shifted_targets(alpaca):
    loader = BatchLoader(alpaca, 8, 256, seed=0, drop_last=False)
    by_ids = {}
    for i in range(len(alpaca)):
        by_ids.setdefault(key(alpaca[i]["input_ids"]), []).append(i)
    seen, real = [], 0
    for batch in loader:
        assert set(batch) == {"input_ids", "targets", "positions", "segment_ids"}
        for name, arr in batch.items():
            assert arr.shape == (8, 256) and arr.dtype == np.int32, name
        for r, a, b in segments(batch):
            ids = batch["input_ids"][r, a:b]
            ex = alpaca[by_ids[key(ids)][0]]
            assert np.array_equal(ids, ex["input_ids"])
            assert np.array_equal(batch["positions"][r, a:b], np.arange(b - a))
            assert np.array_equal(batch["targets"][r, a : b - 1], ex["labels"][1:])  # shifted within example
            assert batch["targets"][r, b - 1] == IGNORE  # never predicts the next example
            seen.append(key(ids))
            real += b - a
        pad = batch["segment_ids"] == 0
        assert (batch["targets"][pad] == IGNORE).all() and (batch["positions"][pad] == 0).all()
    assert sorted(seen) == sorted(key(alpaca[i]["input_ids"]) for i in range(len(alpaca)))
    rows = sum(1 for _ in pack_rows(((i, int(n)) for i, n in enumerate(alpaca.lengths)), 256))
    assert real / (rows * 256) > 0.9  # packing density


def test_unpacked_batches_are_right_padded(alpaca):
    loader = BatchLoader(alpaca, 4, 256, packing=False, shuffle=False)
    batch = next(loader)
    for r in range(4):
        n = len(alpaca[r]["input_ids"])
        assert np.array_equal(batch["input_ids"][r, :n], alpaca[r]["input_ids"])
        assert (batch["segment_ids"][r, :n] == 1).all() and (batch["segment_ids"][r, n:] == 0).all()
        assert (batch["targets"][r, n - 1 :] == IGNORE).all()
    assert loader.num_batches_per_epoch == len(alpaca) // 4


def test_same_seed_same_batches_other_seed_other_order(alpaca):
    a = list(BatchLoader(alpaca, 8, 256, seed=5, num_epochs=2))
    b = list(BatchLoader(alpaca, 8, 256, seed=5, num_epochs=2, prefetch=0))
    c = list(BatchLoader(alpaca, 8, 256, seed=6, num_epochs=2))
    assert len(a) == len(b)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    half = len(a) // 2
    assert not np.array_equal(a[0]["input_ids"], a[half]["input_ids"])  # epochs are reshuffled


@pytest.mark.parametrize("where", ["early", "epoch_end", "second_epoch"])
def test_resume_from_state_gives_the_batches_that_would_have_followed(alpaca, where):
    alpaca = alpaca.select(np.arange(200))
    full = list(BatchLoader(alpaca, 8, 256, seed=1, num_epochs=2))
    per_epoch = BatchLoader(alpaca, 8, 256, seed=1).num_batches_per_epoch
    stop = {"early": 3, "epoch_end": per_epoch, "second_epoch": per_epoch + 4}[where]
    assert stop + 2 < len(full)
    first = BatchLoader(alpaca, 8, 256, seed=1, num_epochs=2)
    for _ in range(stop):
        next(first)
    state = first.state()
    first.close()
    assert set(state) == {"epoch", "step"} and all(isinstance(v, int) for v in state.values())
    json.dumps(state)
    resumed = list(BatchLoader(alpaca, 8, 256, seed=1, num_epochs=2, start_state=state))
    assert len(resumed) == len(full) - stop
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(resumed, full[stop:], strict=True) for k in x)
    other = BatchLoader(alpaca, 8, 256, seed=1, num_epochs=2)
    other.restore(state)
    assert np.array_equal(next(other)["input_ids"], full[stop]["input_ids"])
    other.close()


def test_hosts_get_disjoint_slices_of_each_global_batch(alpaca):
    whole = list(BatchLoader(alpaca, 8, 256, seed=2))
    hosts = [list(BatchLoader(alpaca, 8, 256, seed=2, process_index=p, process_count=2)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole)
    for g, h0, h1 in zip(whole, *hosts, strict=True):
        assert h0["input_ids"].shape == (4, 256)
        for k in g:
            assert np.array_equal(np.concatenate([h0[k], h1[k]]), g[k])
    with pytest.raises(UserError, match="batch_size 8 is not divisible by process_count 3"):
        BatchLoader(alpaca, 8, 256, process_count=3)


def test_loader_rejects_bad_input():
    short = Examples.from_records([{"input_ids": [1, 5, 6, 2]}] * 3)
    with pytest.raises(UserError, match="fewer than batch_size 8"):
        BatchLoader(short, 8, 16, packing=False)
    with pytest.raises(UserError, match="more than seq_len 3"):
        BatchLoader(short, 1, 3)
    loader = BatchLoader(short, 1, 16, packing=False)
    with pytest.raises(UserError, match="step 9 is past the 3 batches of epoch 0"):
        loader.restore({"epoch": 0, "step": 9})


# --- packed loss parity through the model ---------------------------------------------------------


def _nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(targets == IGNORE, 0, targets)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(targets == IGNORE, 0.0, nll)


def test_packed_row_loss_equals_examples_alone_and_attention_stays_in_segment(stories_dir, alpaca):
    from jaxlora.models import forward, load_model

    model = load_model(stories_dir)
    forward = jax.jit(forward, static_argnums=(1,))
    short = alpaca.select(np.flatnonzero(alpaca.lengths < 170)[:12])
    batch = next(BatchLoader(short, 2, 512, seed=0))
    args = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = forward(
        model.params,
        model.config,
        args["input_ids"],
        positions=args["positions"],
        segment_ids=args["segment_ids"],
    )
    packed_nll = np.asarray(_nll(logits, args["targets"]))
    segs = segments(batch)
    assert len(segs) >= 4 and max(batch["segment_ids"].max(axis=1)) >= 2
    # Each example alone in its own row (right padding is never attended to): one compile for all.
    width = max(b - a for _, a, b in segs)
    alone_ids = np.zeros((len(segs), width), np.int32)
    alone_seg = np.zeros((len(segs), width), np.int32)
    for k, (r, a, b) in enumerate(segs):
        alone_ids[k, : b - a] = batch["input_ids"][r, a:b]
        alone_seg[k, : b - a] = 1
    positions = jnp.broadcast_to(jnp.arange(width), alone_ids.shape)
    alone_logits = forward(
        model.params,
        model.config,
        jnp.asarray(alone_ids),
        positions=positions,
        segment_ids=jnp.asarray(alone_seg),
    )
    for k, (r, a, b) in enumerate(segs):
        alone_nll = np.asarray(_nll(alone_logits[k, : b - a], args["targets"][r, a:b]))
        n = int((batch["targets"][r, a:b] != IGNORE).sum())
        assert n > 0
        # Per-example loss (mean over its targets) and sum match; single tokens to float32 noise.
        assert abs(packed_nll[r, a:b].sum() / n - alone_nll.sum() / n) < 1e-5
        np.testing.assert_allclose(packed_nll[r, a:b].sum(), alone_nll.sum(), rtol=1e-5)
        np.testing.assert_allclose(packed_nll[r, a:b], alone_nll, atol=1e-4, rtol=0)
    # Changing the first example of a row changes no logit of the other examples in that row.
    r, a, b = next(s for s in segs if s[1] == 0 and batch["segment_ids"][s[0]].max() >= 2)
    changed = args["input_ids"].at[r, a:b].set((args["input_ids"][r, a:b] + 7) % model.config.vocab_size)
    logits2 = forward(
        model.params, model.config, changed, positions=args["positions"], segment_ids=args["segment_ids"]
    )
    rest = slice(b, int(np.flatnonzero(batch["segment_ids"][r])[-1]) + 1)
    np.testing.assert_array_equal(np.asarray(logits2[r, rest]), np.asarray(logits[r, rest]))
    assert not np.allclose(np.asarray(logits2[r, a:b]), np.asarray(logits[r, a:b]))


@pytest.mark.filterwarnings(
    "ignore:os.fork:RuntimeWarning"
)  # JAX is initialised by conftest; workers never use it
def test_num_proc_gives_the_same_examples_and_row_errors(assets, tok, tmp_path):
    rows = json.loads((assets / "data" / "alpaca_100.json").read_text())
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(num_proc, cache):
        src = DataSource(path=str(path), format="alpaca")
        return DataConfig(
            train=(src,),
            validation_split=0.0,
            seq_len=2048,
            num_proc=num_proc,
            cache_dir=str(tmp_path / cache),
        )

    one, _ = build_datasets(cfg(None, "c1"), tok)
    two, _ = build_datasets(cfg(2, "c2"), tok)
    assert len(one) == len(two) == 100
    assert all(np.array_equal(one[i]["labels"], two[i]["labels"]) for i in range(100))
    rows[80]["output"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=f"{path}: row 80: field 'output' is empty"):
        build_datasets(cfg(2, "c2"), tok)


def test_bench_script_runs(assets, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--rows", "300", "--workdir", str(tmp_path)])
    cold, cached = bench.bench(args)
    assert cold["examples"] == cached["examples"] > 250
    assert cached["tokenize_s"] < cold["tokenize_s"]
    table = bench._table([cold, cached], 300)
    assert table.splitlines()[2].startswith("cold") and table.splitlines()[3].startswith("cached")
