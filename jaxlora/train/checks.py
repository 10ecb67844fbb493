"""Start-up checks that turn a later, obscure failure into one clear line before anything is written.

A tokenizer with more tokens than the model's embedding would only show up as NaN at step 1, a folder
without tokenizer files as a message about sentencepiece, and a warmup longer than the run as a
silently cut schedule (now a warning line).
"""

import sys
from pathlib import Path

from jaxlora.config import Config, TrainSection
from jaxlora.errors import UserError
from jaxlora.models import load_tokenizer
from jaxlora.models.config import ModelSource
from jaxlora.models.loading import model_source
from jaxlora.train.vocab import add_tokens

# Any one of these makes a folder a tokenizer (fast tokenizers, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_checked_tokenizer(cfg: Config, model: ModelSource | None = None):
    """The run's tokenizer (model.tokenizer, else the model's folder), checked to exist and to fit the
    model's vocabulary, with `data.add_special_tokens` added. `model`: the model's folder and config.json
    as setup read them (`setup.open_model`); read here when not given."""
    model = model or model_source(cfg.model.path, cfg.model.revision)
    model_dir = model.folder
    source = cfg.model.tokenizer or model_dir
    where = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{where} {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer there or set model.tokenizer to a folder or hub id that has one"
        )
    try:
        tokenizer = load_tokenizer(str(folder) if folder.is_dir() else source)
    except (OSError, ValueError, ImportError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load the tokenizer from {where} {source}: {first}") from None
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise UserError(
            f"the tokenizer of {where} {source} has {len(tokenizer)} tokens but the model's vocabulary "
            f"(vocab_size in {model_dir / 'config.json'}) has {vocab}; use the tokenizer made for the model"
        )
    add_tokens(tokenizer, cfg.data.add_special_tokens)  # the model grows to fit them (`load_base`)
    return tokenizer


def check_schedule(train: TrainSection, total_steps: int) -> None:
    """A `train.warmup_steps` set longer than the run is an error; the default one (not set) is cut to the
    run's length with a warning. `train.warmup_ratio` follows the run's length."""
    if train.warmup_ratio is not None or train.warmup_steps <= total_steps:
        return
    hint = "set train.warmup_ratio (e.g. 0.1) to warm up for a fraction of the run"
    if "warmup_steps" in train.model_fields_set:
        raise UserError(
            f"train.warmup_steps {train.warmup_steps} is more than the run's {total_steps} steps; lower it, "
            f"or {hint}"
        )
    print(
        f"warning: the default train.warmup_steps {train.warmup_steps} is more than the run's {total_steps} "
        f"steps; the warmup is cut to {max(total_steps - 1, 0)} ({hint})",
        file=sys.stderr,
    )
