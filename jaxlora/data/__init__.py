"""The dataset pipeline: sources -> formats -> tokens and labels -> packed, sharded, resumable batches.

    train, val = build_datasets(cfg.data, tokenizer, seed)
    loader = BatchLoader(train, batch_size, cfg.data.seq_len, packing=cfg.data.packing, seed=seed)
    for batch in loader: ...   # input_ids, targets (shifted), positions, segment_ids: int32 [B, T]

See docs/data-formats.md for the formats, the masking rules and the bad-input behaviour.
"""

from jaxlora.data.build import build_datasets, default_cache_dir, load_source
from jaxlora.data.examples import Examples
from jaxlora.data.formats import FORMATS
from jaxlora.data.loader import BatchLoader
from jaxlora.data.packing import make_batch, pack_rows
from jaxlora.data.preference import PAIR_KEYS, PairLoader, Pairs, build_pairs
from jaxlora.data.templates import CHAT_TEMPLATES
from jaxlora.data.tokenize import IGNORE

__all__ = [
    "CHAT_TEMPLATES",
    "FORMATS",
    "IGNORE",
    "PAIR_KEYS",
    "BatchLoader",
    "Examples",
    "PairLoader",
    "Pairs",
    "build_datasets",
    "build_pairs",
    "default_cache_dir",
    "load_source",
    "make_batch",
    "pack_rows",
]
