"""Tokens added to the tokenizer (`data.add_special_tokens`), from the tokenizer to the run folder.

    add_tokens(tokenizer, texts)            the tokens, added as special tokens (transformers' call)
    resolve_token_texts(cfg, tokenizer)     lora.trainable_token_indices texts -> ids; new rows must train
    grow_base(model, vocab, seed)           the embedding grown to the tokenizer (`jaxlora.models.vocab`)
    save_run_vocab(run, tokenizer, rows)    run/tokenizer/ and run/added_tokens.safetensors
    read_run_vocab(run)                     the same, for `export --run`

The rows drawn for the new tokens are saved once, at commit, so an export from the run's checkpoints
rebuilds exactly the base it trained on, whatever dtype it loads the model in.
"""

import dataclasses
import inspect
from pathlib import Path

import numpy as np

from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.models import Model, load_tokenizer
from jaxlora.models.safetensors_io import SafetensorsFile, write_safetensors
from jaxlora.models.vocab import grow_vocab, new_rows

TOKENIZER_DIR = "tokenizer"
ROWS_FILE = "added_tokens.safetensors"


def add_tokens(tokenizer, texts) -> list[int]:
    """Add `texts` to the tokenizer as special tokens (never split; skipped when decoding with
    `skip_special_tokens`), as `tokenizer.add_special_tokens` does; returns their ids. Tokens the tokenizer
    already has keep their ids."""
    if not texts:
        return []
    if "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": list(texts)}, replace_extra_special_tokens=False
        )
    else:  # transformers 4
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(texts)}, replace_additional_special_tokens=False
        )
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(texts))]


def resolve_token_texts(cfg: Config, tokenizer, base_vocab: int) -> Config:
    """`cfg` with the token texts of `lora.trainable_token_indices` turned into ids. A token of
    `data.add_special_tokens` that got a new row (id >= `base_vocab`, the model's vocabulary before) must
    train: UserError unless it is in trainable_token_indices or an embedding copy trains
    (`lora.modules_to_save`)."""
    indices = cfg.lora.trainable_token_indices
    if indices is not None and any(isinstance(i, str) for i in indices):
        ids = []
        for i in indices:
            if isinstance(i, str):
                got = tokenizer.convert_tokens_to_ids(i)
                if got is None or got == tokenizer.unk_token_id and i != tokenizer.unk_token:
                    raise UserError(
                        f"lora.trainable_token_indices: {i!r} is not a token of the tokenizer; add it with "
                        "data.add_special_tokens or give its id"
                    )
                i = int(got)
            ids.append(i)
        cfg = cfg.model_copy(
            update={"lora": cfg.lora.model_copy(update={"trainable_token_indices": tuple(ids)})}
        )
    added = cfg.data.add_special_tokens
    ids = tokenizer.convert_tokens_to_ids(list(added))
    new = {t: int(i) for t, i in zip(added, ids, strict=True) if i >= base_vocab}
    copies = cfg.lora.modules_to_save or ()
    trained = set(cfg.lora.trainable_token_indices or ())
    untrained = [t for t, i in new.items() if i not in trained]
    if untrained and not any(n.rsplit(".", 1)[-1] in ("embed_tokens", "wte") for n in copies):
        raise UserError(
            f"data.add_special_tokens: the new tokens {untrained} get embedding rows that nothing trains; "
            "list them in lora.trainable_token_indices (texts or ids) or set lora.modules_to_save: "
            "[embed_tokens, lm_head]"
        )
    return cfg


def grow_base(model: Model, vocab_size: int, seed: int, rows: dict | None = None) -> tuple[Model, dict]:
    """(`model` with its vocabulary grown to `vocab_size`, the rows added {"embed": [k, D], "lm_head": [k, D]
    (untied)}); `rows` as a run saved them, else drawn (`models.vocab.new_rows`)."""
    if rows is None:
        rows = new_rows(model.params, model.config, vocab_size, seed)
    params, cfg = grow_vocab(model.params, model.config, rows)
    return dataclasses.replace(model, params=params, config=cfg), rows


def save_run_vocab(run: Path, tokenizer, rows: dict | None, base_vocab: int) -> None:
    """The run's tokenizer (run/tokenizer/) and, when the vocabulary grew, the rows it drew."""
    tokenizer.save_pretrained(str(run / TOKENIZER_DIR))
    if rows:
        meta = {"base_vocab_size": str(base_vocab)}
        write_safetensors(
            run / ROWS_FILE, {k: np.asarray(v, np.float32) for k, v in rows.items()}, metadata=meta
        )


def read_run_vocab(run: Path) -> tuple[object, dict | None]:
    """(the run's tokenizer or None for a run without one, its drawn rows or None); a run folder of
    before `data.add_special_tokens` has neither."""
    tok = load_tokenizer(str(run / TOKENIZER_DIR)) if (run / TOKENIZER_DIR).is_dir() else None
    if not (run / ROWS_FILE).is_file():
        return tok, None
    st = SafetensorsFile(run / ROWS_FILE)
    return tok, {k: np.asarray(st.get(k), np.float32) for k in st.names()}
