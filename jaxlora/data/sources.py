"""Where rows come from: local files (json, jsonl, csv, parquet, txt) or a Hugging Face hub dataset.

A path that exists, has a known extension, or looks like a file path (`/`, `./`, `~`, a glob) is local;
anything else (`owner/name`) is a hub dataset id, loaded with `subset` and `split`. A `.txt` file is one
document (for many documents use jsonl with a `text` field).
"""

import codecs
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from jaxlora.errors import UserError

log = logging.getLogger("jaxlora.data")

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")  # checked to be UTF-8 before `datasets` reads them


@dataclass(frozen=True)
class ResolvedSource:
    """A data source made concrete: local files with their builder, or a hub id (`files` empty)."""

    name: str
    files: tuple[str, ...]
    builder: str | None
    split: str
    subset: str | None

    @property
    def is_local(self) -> bool:
        """True for local files or folders."""
        return bool(self.files)


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(os.path.expanduser(path))
        or path.startswith(("/", "./", "../", "~"))
        or Path(path).suffix in LOCAL_BUILDERS
        or any(c in path for c in "*?[")
    )


def resolve_source(source) -> ResolvedSource:
    """Check a source's path (missing file, unknown extension) and decide how it loads."""
    path = str(source.path)
    split = source.split or "train"
    if not _looks_local(path):
        return ResolvedSource(path, (), None, split, source.subset)
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        files = sorted(glob.glob(expanded, recursive=True))
        if not files:
            raise UserError(f"data file not found: no file matches {path}")
    elif os.path.isdir(expanded):
        files = sorted(
            str(p) for p in Path(expanded).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise UserError(f"data folder is empty: {path}")
        kinds = sorted({Path(f).suffix for f in files} & set(LOCAL_BUILDERS))
        if len(kinds) > 1:  # `datasets` would silently read only one of the types
            counts = ", ".join(f"{k}: {sum(Path(f).suffix == k for f in files)}" for k in kinds)
            raise UserError(
                f"data folder {path} mixes file types ({counts} files); only one type is read, so put each "
                "type in its own folder (or list each file as its own data source)"
            )
        # A folder loads like a hub dataset (datasets infers the layout); its files give the content hash.
        return ResolvedSource(path, tuple(files), None, split, source.subset)
    elif os.path.isfile(expanded):
        files = [expanded]
    else:
        raise UserError(f"data file not found: {path}")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in LOCAL_BUILDERS:
        raise UserError(
            f"{path}: unsupported file type {sorted(suffixes)}; use one of: {', '.join(LOCAL_BUILDERS)}"
        )
    return ResolvedSource(path, tuple(files), LOCAL_BUILDERS[suffixes.pop()], split, source.subset)


def content_hash(resolved: ResolvedSource) -> str:
    """A hash of the local files' contents (empty for hub datasets, which use their own fingerprint)."""
    h = hashlib.sha256()
    for f in resolved.files:
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def has_mixed_types(features) -> bool:
    """True when `datasets` stored a column as `Json` because its rows mix types."""
    if isinstance(features, datasets.Json):
        return True
    if isinstance(features, dict):
        return any(has_mixed_types(f) for f in features.values())
    inner = getattr(features, "feature", None)
    return inner is not None and has_mixed_types(inner)


def read_json_rows(resolved: ResolvedSource) -> list:
    """Rows of local .json (a list) / .jsonl files parsed by Python, with their original types."""
    rows: list = []
    for f in resolved.files:
        problem = diagnose_file(f)
        if problem:
            raise UserError(problem)
        with open(f, encoding="utf-8") as fh:
            if f.endswith(".jsonl"):
                rows.extend(json.loads(line) for line in fh if line.strip())
            else:
                data = json.load(fh)
                if not isinstance(data, list):
                    raise UserError(f"{f}: expected a JSON list of records, got {type(data).__name__}")
                rows.extend(data)
    return rows


def diagnose_file(path: str) -> str | None:
    """Why a local json/jsonl/csv/txt file cannot be read, naming the file, the line and the cause
    (encoding included); None when nothing is found. Called when `datasets` fails, whose messages name
    neither."""
    problem = encoding_problem(path)
    if problem:
        return problem
    text = Path(path).read_text(encoding="utf-8")
    suffix = Path(path).suffix
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{path}, line {n}: invalid JSON ({err.msg} at column {err.colno})"
    elif suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data" and _is_json_lines(text):
                return f"{path}: holds one JSON object per line; name it .jsonl"
            return f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
    elif suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    return (
                        f"{path}, line {reader.line_num}: {len(row)} fields but the header has "
                        f"{len(header)}; quote fields that hold commas"
                    )
        except csv.Error as err:
            return f"{path}, line {reader.line_num}: bad CSV ({err})"
    return None


def encoding_problem(path: str, chunk: int = 1 << 24) -> str | None:
    """The first line of `path` that is not UTF-8 (read in chunks), or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block, final=len(block) < chunk)
            except UnicodeDecodeError as err:
                head = block[: max(err.start, 0)]
                line += head.count(b"\n")
                column = len(head) - (head.rfind(b"\n") + 1) + 1
                bad = block[err.start] if 0 <= err.start < len(block) else 0
                return (
                    f"{path}, line {line}: not UTF-8 text (byte 0x{bad:02x} at column {column}); "
                    "save the file as UTF-8"
                )
            line += block.count(b"\n")
    return None


def _is_json_lines(text: str) -> bool:
    try:
        return all(isinstance(json.loads(x), dict) for x in text.splitlines() if x.strip())
    except json.JSONDecodeError:
        return False


def _csv_string_features(files) -> datasets.Features:
    columns: dict[str, None] = {}
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            columns.update(dict.fromkeys(next(csv.reader(fh), [])))
    return datasets.Features({c: datasets.Value("string") for c in columns})


def load_rows(resolved: ResolvedSource, *, streaming: bool, cache_dir: str | None):
    """Load the raw rows as a `datasets.Dataset` (or `IterableDataset` when streaming)."""
    kwargs = {"split": resolved.split, "streaming": streaming, "cache_dir": cache_dir}
    for f in resolved.files:  # datasets reads other encodings as if they were UTF-8, or fails later
        problem = encoding_problem(f) if Path(f).suffix in TEXT_SUFFIXES else None
        if problem:
            raise UserError(problem)
    try:
        if resolved.builder is not None:
            extra = {}
            if resolved.builder == "text":
                extra = {"sample_by": "document"}
            elif resolved.builder == "csv":  # every cell is text ("4" stays "4"), an empty cell is ""
                extra = {"features": _csv_string_features(resolved.files), "keep_default_na": False}
            return datasets.load_dataset(resolved.builder, data_files=list(resolved.files), **extra, **kwargs)
        target = os.path.expanduser(resolved.name) if resolved.is_local else resolved.name
        return datasets.load_dataset(target, resolved.subset, **kwargs)
    except (FileNotFoundError, ConnectionError, ValueError, DatasetGenerationError) as err:
        for f in resolved.files:  # name the file, the line and the cause
            problem = diagnose_file(f) if Path(f).suffix in TEXT_SUFFIXES else None
            if problem:
                raise UserError(problem) from None
        what = "data files" if resolved.is_local else "hub dataset"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load {what} {resolved.name} (split {resolved.split}): {first}") from err


def subset_rows(rows, source, name: str):
    """The rows a source's `max_samples` keeps: the first N, or N drawn without replacement by
    `numpy.random.default_rng(sample_seed)` and kept in file order; a stream takes its first N.

    Returns (rows, their row numbers in the whole source as an int64 array, or None when unchanged or
    streamed), so errors can name the row of the file.
    """
    n = getattr(source, "max_samples", None)
    if n is None:
        return rows, None
    if isinstance(rows, datasets.IterableDataset):
        return rows.take(n), None
    total = len(rows)
    seed = getattr(source, "sample_seed", None)
    if seed is None:
        index = np.arange(min(n, total))
    else:
        index = np.sort(np.random.default_rng(seed).permutation(total)[:n])
    how = "the first" if seed is None else f"drawn with sample_seed {seed}:"
    log.info("%s: max_samples %d: %s %d of %d rows", name, n, how, len(index), total)
    return (rows.select(index) if len(index) < total else rows), index


@contextlib.contextmanager
def bars_on_terminal_only():
    """Turn `datasets`' progress bars (reading, tokenizing, saving) off while stderr is not a terminal,
    so a log file gets no carriage-return lines; they come back on afterwards."""
    if sys.stderr.isatty() or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
