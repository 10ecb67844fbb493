"""`build_datasets`: sources -> tokenized `Examples` for training and validation, cached on disk.

Each source is tokenized with `datasets.map` (batched, fast tokenizer, optional `num_proc`) and saved under
`<cache_dir>/<key>`, where the key hashes the files' contents, the tokenizer, the chat template and every
option that changes the result; a second run memory-maps the saved Arrow files and starts at once.
The cache dir is `data.cache_dir`, else `$JAXLORA_DATA_CACHE`, else `~/.cache/jaxlora/datasets`.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import datasets
import numpy as np
import tokenizers

from jaxlora.data.examples import Examples
from jaxlora.data.formats import RowError, make_renderer, resolve_fields, row_columns
from jaxlora.data.sources import (
    bars_on_terminal_only,
    content_hash,
    has_mixed_types,
    load_rows,
    read_json_rows,
    resolve_source,
    subset_rows,
)
from jaxlora.data.templates import resolve_chat_template
from jaxlora.data.tokenize import IGNORE, TokenizerInfo, chunk_tokens, encode_rendered, tokenizer_info
from jaxlora.errors import UserError

log = logging.getLogger("jaxlora.data")

# The cache is keyed by the code that shapes examples too, so a changed pipeline never reads stale data.
_CODE = hashlib.sha256(
    b"".join(
        (Path(__file__).parent / f).read_bytes()
        for f in ("build.py", "formats.py", "templates.py", "tokenize.py")
    )
).hexdigest()[:16]
ROW_ERROR = "_jaxlora_row_error"  # column marking rows found bad before tokenization
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
    }
)


def default_cache_dir() -> Path:
    """Where tokenized datasets are cached unless `data.cache_dir` says otherwise."""
    env = os.environ.get("JAXLORA_DATA_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/jaxlora/datasets").expanduser()


class _Encoder:
    """The `datasets.map` function: raw rows -> input_ids/labels, checking each row."""

    def __init__(self, name, renderer, tokenizer, info: TokenizerInfo, data_cfg, is_text: bool, numbers=None):
        self.name, self.renderer, self.tokenizer, self.info = name, renderer, tokenizer, info
        self.numbers = numbers  # the rows' numbers in the whole source (max_samples), or None: the same
        self.seq_len = data_cfg.seq_len
        self.truncation, self.skip_invalid = data_cfg.truncation, data_cfg.skip_invalid
        self.train_on_inputs = data_cfg.train_on_inputs
        self.is_text = is_text

    def _bad(self, row: int, msg: str) -> None:
        if not self.skip_invalid:
            row = row if self.numbers is None else int(self.numbers[row])
            raise UserError(f"{self.name}: row {row}: {msg}")

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        errors = batch.get(ROW_ERROR)
        rendered, rows = [], []
        for j, i in enumerate(indices):
            if errors is not None and errors[j]:
                self._bad(i, errors[j])
                continue
            try:
                rendered.append(self.renderer({k: batch[k][j] for k in keys}))
                rows.append(i)
            except RowError as err:
                self._bad(i, str(err))
        out_ids, out_labels = [], []
        encoded = encode_rendered(self.tokenizer, self.info, rendered, self.train_on_inputs)
        for i, (ids, labels) in zip(rows, encoded, strict=True):
            if len(ids) > self.seq_len and not self.is_text:
                if not self.truncation:
                    self._bad(
                        i,
                        f"example is {len(ids)} tokens, longer than seq_len {self.seq_len} "
                        "(set data.truncation: true to cut it, or raise data.seq_len)",
                    )
                    continue
                ids, labels = ids[: self.seq_len], labels[: self.seq_len]
                if not (labels[1:] != IGNORE).any():
                    continue  # truncation cut away every trained token
            out_ids.append(ids)
            out_labels.append(labels)
        return {"input_ids": out_ids, "labels": out_labels}


class _Chunker:
    """The second `datasets.map` for the `text` format: documents -> pieces of `seq_len` tokens."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, batch: dict) -> dict:
        ids = [np.asarray(x, np.int32) for x in batch["input_ids"]]
        labels = [np.asarray(x, np.int32) for x in batch["labels"]]
        out_ids, out_labels = chunk_tokens(ids, labels, self.seq_len)
        return {"input_ids": out_ids, "labels": out_labels}


def _cache_key(source, resolved, data_cfg, info: TokenizerInfo, template: str | None, raw_fp: str) -> str:
    parts = {
        "code": _CODE,
        "tokenizers": tokenizers.__version__,
        "content": raw_fp,
        "split": resolved.split,
        "subset": resolved.subset,
        "format": source.format,
        "fields": _plain(source.fields),
        "tokenizer": info.fingerprint,
        "template": template,
        "seq_len": data_cfg.seq_len,
        "truncation": data_cfg.truncation,
        "train_on_inputs": data_cfg.train_on_inputs,
        "skip_invalid": data_cfg.skip_invalid,
        "max_samples": source.max_samples,
        "sample_seed": source.sample_seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _plain(value):
    """Mappings as sorted plain dicts, so a frozen mapping hashes like a dict."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value


def _chat_template(source, data_cfg, tokenizer) -> str | None:
    return resolve_chat_template(tokenizer, data_cfg.chat_template) if source.format == "chat" else None


def _retyped_rows(resolved, source, tokenizer, template) -> datasets.Dataset:
    """Re-read local JSON whose columns mix types, which `datasets` stores as `Json` (and so would turn
    the string "1" into the number 1). Rows are checked in Python with their real types; good rows keep the
    columns the format reads, bad rows carry their error in `ROW_ERROR`."""
    raw = read_json_rows(resolved)
    columns = sorted({k for r in raw if isinstance(r, dict) for k in r})
    names = resolve_fields(source.format, source.fields, columns)
    renderer = make_renderer(source.format, names, tokenizer, template)
    used = row_columns(source.format, names)
    records = []
    for row in raw:
        error = None
        try:
            if not isinstance(row, dict):
                raise RowError(f"must be an object, got {type(row).__name__}")
            renderer(row)
        except RowError as err:
            error = str(err)
        rec = {c: None for c in used}
        if error is None:
            rec = {c: row.get(c) for c in used}
            if source.format == "chat":
                keep = (names["role"], names["content"])
                rec[used[0]] = [{k: m.get(k) for k in keep} for m in row[used[0]]]
        rec[ROW_ERROR] = error
        records.append(rec)
    return datasets.Dataset.from_list(records)


def _tokenize(rows, source, name, data_cfg, tokenizer, info, template, cache_files: str | None, numbers=None):
    """Run the map(s) over raw rows; `cache_files` is a folder for map outputs (None when streaming);
    `numbers`: the rows' numbers in the whole source when `max_samples` picked them (for error messages).

    Returns (tokenized dataset, number of raw rows kept).
    """
    columns = list(rows.column_names or [])
    if not columns and isinstance(rows, datasets.IterableDataset):  # a stream may not know its columns
        columns = list(next(iter(rows), None) or [])
    names = resolve_fields(source.format, source.fields, columns)
    renderer = make_renderer(source.format, names, tokenizer, template)
    encoder = _Encoder(name, renderer, tokenizer, info, data_cfg, source.format == "text", numbers)
    kwargs = {"batched": True, "remove_columns": columns or None, "features": _FEATURES}
    if cache_files is not None:
        num_proc = data_cfg.num_proc if (data_cfg.num_proc or 1) > 1 else None
        kwargs.update(num_proc=num_proc, desc=f"tokenizing {name}")
    if source.format == "text":
        kwargs["batch_size"] = 16  # documents may be long; keep map batches small

    def files(step: str) -> dict:
        if cache_files is None:
            return {}
        tag = os.path.basename(os.path.dirname(cache_files))
        return {
            "cache_file_name": os.path.join(cache_files, f"{step}.arrow"),
            "new_fingerprint": f"{step}-{tag}",
        }

    out = rows.map(encoder, with_indices=True, **kwargs, **files("tokens"))
    if cache_files is None:
        out = out.select_columns(["input_ids", "labels"])
    kept = len(out) if cache_files is not None else None
    if source.format == "text":
        kwargs.update(remove_columns=["input_ids", "labels"], desc=f"chunking {name}")
        if cache_files is None:
            kwargs.pop("desc")
        out = out.map(_Chunker(data_cfg.seq_len), **kwargs, **files("chunks"))
    return out, kept


@bars_on_terminal_only()
def load_source(source, data_cfg, tokenizer, info: TokenizerInfo | None = None):
    """Tokenize one source (cached); returns `Examples`, or a `datasets.IterableDataset` when streaming."""
    if source.format == "preference":
        raise UserError(
            f"{source.path}: format preference holds pairs for train.objective dpo or orpo, not sft"
        )
    info = info or tokenizer_info(tokenizer)
    resolved = resolve_source(source)
    template = _chat_template(source, data_cfg, tokenizer)
    root = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else default_cache_dir()
    if getattr(source, "streaming", False):
        rows, _ = subset_rows(
            load_rows(resolved, streaming=True, cache_dir=str(root / "hf")), source, resolved.name
        )
        return _tokenize(rows, source, resolved.name, data_cfg, tokenizer, info, template, None)[0]

    rows = None
    if resolved.is_local:
        raw_fp = content_hash(resolved)
    else:
        rows = load_rows(resolved, streaming=False, cache_dir=str(root / "hf"))
        raw_fp = "hub:" + rows._fingerprint
    key = _cache_key(source, resolved, data_cfg, info, template, raw_fp)
    final = root / key
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        _report(resolved.name, meta, cached=True, skip_invalid=data_cfg.skip_invalid)
        return Examples.from_dataset(datasets.load_from_disk(str(final / "data")))

    t0 = time.perf_counter()
    if rows is None:
        rows = load_rows(resolved, streaming=False, cache_dir=str(root / "hf"))
        if resolved.builder == "json" and has_mixed_types(rows.features):
            rows = _retyped_rows(resolved, source, tokenizer, template)
    rows, numbers = subset_rows(rows, source, resolved.name)
    meta = _write_cache(final, rows, source, resolved, data_cfg, tokenizer, info, template, t0, numbers)
    _report(resolved.name, meta, cached=False, skip_invalid=data_cfg.skip_invalid)
    return Examples.from_dataset(datasets.load_from_disk(str(final / "data")))


def _write_cache(
    final: Path, rows, source, resolved, data_cfg, tokenizer, info, template, t0: float, numbers=None
) -> dict:
    """Tokenize `rows` into a fresh folder beside `final`, then rename it to `final` (a failure or a signal
    leaves no partial cache; when another process finished the same key first, its folder stays); returns
    the cache's meta (rows, kept rows, examples, seconds since `t0`)."""
    root, key = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
    try:
        maps = os.path.join(work, "maps")
        os.makedirs(maps)
        out, kept = _tokenize(rows, source, resolved.name, data_cfg, tokenizer, info, template, maps, numbers)
        seconds = time.perf_counter() - t0
        meta = {"rows": len(rows), "kept_rows": kept, "examples": len(out), "seconds": seconds}
        if len(out) == 0:
            _report(resolved.name, meta, cached=False, skip_invalid=data_cfg.skip_invalid)
            if len(rows) == 0:
                raise UserError(f"{resolved.name}: the dataset has no rows")
            raise UserError(
                f"{resolved.name}: no examples left after skipping invalid rows ({len(rows)} skipped)"
            )
        out.save_to_disk(os.path.join(work, "data"))
        del out
        shutil.rmtree(maps, ignore_errors=True)
        Path(work, "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(work, final)
        except OSError:  # another process finished the same key first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta


def _report(name: str, meta: dict, cached: bool, skip_invalid: bool) -> None:
    skipped = meta["rows"] - meta["kept_rows"]
    how = "from cache" if cached else f"in {meta['seconds']:.1f}s"
    log.info("%s: %d examples from %d rows (%s)", name, meta["examples"], meta["rows"], how)
    if skipped and skip_invalid:
        log.warning(
            "%s: skipped %d of %d rows (invalid, or nothing left to train on after truncation); "
            "set data.skip_invalid: false to see the first error",
            name,
            skipped,
            meta["rows"],
        )
    elif skipped:  # rows are only dropped silently when truncation cut away every trained token
        log.warning(
            "%s: dropped %d of %d rows: truncation to data.seq_len cut away every token to train on; "
            "raise data.seq_len to keep them",
            name,
            skipped,
            meta["rows"],
        )


def _concat(parts: list):
    if any(isinstance(p, datasets.IterableDataset) for p in parts):
        streams = [p if isinstance(p, datasets.IterableDataset) else _as_stream(p) for p in parts]
        if len(streams) == 1:
            return streams[0]
        return datasets.interleave_datasets(streams, stopping_strategy="all_exhausted_without_replacement")
    return Examples.concat(parts)


def _as_stream(examples: Examples) -> datasets.IterableDataset:
    def gen():
        for i in range(len(examples)):
            ex = examples[i]
            yield {"input_ids": ex["input_ids"].tolist(), "labels": ex["labels"].tolist()}

    return datasets.IterableDataset.from_generator(gen, features=_FEATURES)


def build_datasets(data_cfg, tokenizer, seed: int = 0):
    """Tokenize `data_cfg.train` (and `data_cfg.validation`) into examples ready for `BatchLoader`.

    Returns `(train, validation)`: `Examples` (or a `datasets.IterableDataset` when a source streams);
    `validation` is `None` when there is none. Without validation sources, a `validation_split`
    fraction of the train examples (chosen by `seed`) is held out; streamed data is never split.
    Raises `UserError` for bad sources, bad rows (unless `skip_invalid`) and empty results; the config
    values themselves are validated by `jaxlora.data.config.DataConfig`.
    """
    info = tokenizer_info(tokenizer)
    train_parts = [load_source(s, data_cfg, tokenizer, info) for s in data_cfg.train]
    val_parts = [load_source(s, data_cfg, tokenizer, info) for s in (data_cfg.validation or ())]
    train = _concat(train_parts)
    val = _concat(val_parts) if val_parts else None
    split = data_cfg.validation_split
    if val is None and split > 0:
        if isinstance(train, Examples):
            n = len(train)
            n_val = min(max(1, round(n * split)), n - 1) if n > 1 else 0
            if n_val:
                perm = np.random.default_rng(seed).permutation(n)
                val = train.select(np.sort(perm[:n_val]))
                train = train.select(np.sort(perm[n_val:]))
        else:
            log.info("streamed training data is not split; list data.validation sources for validation")
    return train, val
