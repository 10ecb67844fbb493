"""The `data:` section of a run: `DataConfig` and its `DataSource` items, owned by the data layer."""

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from jaxlora.data.formats import FORMAT_FIELDS, FORMATS
from jaxlora.schema import Bool, Float, Int, Invalid, NonBlank, Section, Str, listing, show

__all__ = ["DataConfig", "DataSource", "FrozenDict"]


class FrozenDict(dict):
    """A read-only, hashable `dict` (`DataSource.fields`).

    Hand-written because neither pydantic nor the standard library has a hashable mapping, and a
    `Config` hashes (it is compared and cached as a whole).
    """

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("FrozenDict is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict((k, _freeze(v)) for k, v in value.items())
    return value


Fields = Annotated[dict[Str, Str | dict[Str, Str]], AfterValidator(_freeze)]


class DataSource(Section):
    """One dataset: a local file/folder or a hub dataset, in one of the supported formats."""

    _prefix = "DataSource"
    _aliases = {"type": "format", "name": "subset", "data_files": "path", "columns": "fields"}

    path: NonBlank = Field(description="local .json/.jsonl/.parquet file or folder, or HF hub dataset id")
    format: Literal[FORMATS] = Field(
        description="record layout: alpaca, chat (messages), prompt_completion, text, preference (pairs) "
        "or prompt (GRPO: prompts only)"
    )
    split: Str | None = Field(None, description="hub dataset split; null = train")
    subset: Str | None = Field(None, description="hub dataset configuration name; null = the default")
    fields: Fields | None = Field(
        None,
        description="rename map from the format's field names to this dataset's columns, "
        "e.g. {output: answer}",
    )
    streaming: Bool = Field(False, description="stream the dataset instead of downloading it whole")
    max_samples: Int | None = Field(
        None,
        ge=1,
        description="read only N rows of this source: the first N, or N drawn at random with sample_seed; "
        "null = every row",
    )
    sample_seed: Int | None = Field(
        None,
        description="with max_samples: draw the N rows at random with this seed (numpy default_rng, "
        "kept in file order) instead of taking the first N",
    )

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, fmt: Any) -> Any:
        if isinstance(fmt, str) and fmt not in FORMATS:
            raise Invalid(
                "{key}: unknown data format {fmt!r}; valid formats: {valid}",
                fmt=fmt,
                valid=", ".join(FORMATS),
            )
        return fmt

    @model_validator(mode="after")
    def _sample_seed_needs_max_samples(self) -> "DataSource":
        if self.sample_seed is not None and self.max_samples is None:
            raise Invalid("{sample_seed} draws max_samples rows at random; set {max_samples} too")
        if self.sample_seed is not None and self.streaming:
            raise Invalid(
                "{sample_seed} needs the whole dataset to draw from; a stream takes its first "
                "{max_samples} rows: drop sample_seed or set streaming: false"
            )
        return self

    @model_validator(mode="after")
    def _fields_fit_the_format(self) -> "DataSource":
        for name, column in (self.fields or {}).items():
            known = FORMAT_FIELDS[self.format]
            if name not in known:
                raise Invalid(
                    "{fields}: unknown field {name!r} for format {format}; known: {known}",
                    name=name, format=self.format, known=", ".join(known),
                )  # fmt: skip
            if name == "roles":  # dataset role name -> system, user, assistant or tool
                if not isinstance(column, Mapping):
                    raise Invalid(
                        "{key} must map dataset role names to roles, got {got}",
                        at=f"fields.{name}", got=show(column),
                    )  # fmt: skip
            elif not isinstance(column, str) or not column.strip():
                raise Invalid("{key} must name a column, got {got}", at=f"fields.{name}", got=show(column))
        return self


class DataConfig(Section):
    """Datasets and how they become token batches."""

    _prefix = "data"

    train: listing(DataSource) = Field(description="training datasets, mixed in order")
    validation: listing(DataSource) = Field(
        (), description="validation datasets; empty = split off data.train"
    )
    validation_split: Float = Field(
        0.05,
        ge=0,
        lt=1,
        description="fraction of data.train held out for validation when data.validation is empty, in [0, 1)",
    )
    seq_len: Int = Field(512, ge=2, description="tokens per training sequence")
    packing: Bool = Field(
        True, description="pack several examples into each sequence (attention kept per example)"
    )
    train_on_inputs: Bool = Field(
        False, description="compute the loss on prompt tokens too, not only on responses"
    )
    chat_template: Str | None = Field(
        None,
        description="Jinja chat template text, or a path to a .jinja file; null = the tokenizer's template",
    )
    add_special_tokens: listing(NonBlank) = Field(
        (),
        description="tokens added to the tokenizer as special tokens (e.g. chat markers); the embedding "
        "grows to fit as transformers' resize_token_embeddings does; train their rows with "
        "lora.trainable_token_indices or lora.modules_to_save",
    )
    skip_invalid: Bool = Field(
        False, description="skip malformed records (counted and reported) instead of failing"
    )
    truncation: Bool = Field(False, description="truncate examples longer than seq_len instead of failing")
    num_proc: Int | None = Field(None, ge=1, description="worker processes for tokenization; null = one")
    cache_dir: NonBlank | None = Field(
        None, description="folder for downloaded and tokenized data; null = HF default"
    )
    shuffle: Bool = Field(True, description="shuffle training examples (with seed)")

    @model_validator(mode="after")
    def _has_training_data(self) -> "DataConfig":
        if not self.train:
            raise Invalid("{train} must list at least one dataset (path and format)")
        return self
