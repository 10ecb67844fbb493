"""What a run stands on before its first step: the `Plan` (devices and hosts, checked against the model's
config.json), the frozen base weights on the devices, and the training and validation data."""

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from jaxlora.config import Config
from jaxlora.data import BatchLoader, PairLoader, Pairs
from jaxlora.errors import UserError
from jaxlora.models import DecoderConfig, load_model
from jaxlora.models.config import ModelSource
from jaxlora.models.loading import model_source
from jaxlora.parallel import Plan, init_distributed, make_plan
from jaxlora.quant import make_quantizer
from jaxlora.train.grpo_feed import build_grpo_data
from jaxlora.train.registry import OBJECTIVES
from jaxlora.train.vocab import grow_base

log = logging.getLogger("jaxlora.train")


def open_model(cfg: Config) -> ModelSource:
    """The model's folder (a hub id downloaded) and its config.json, read once: the plan, the tokenizer
    check and the loader all take it from here."""
    return model_source(cfg.model.path, cfg.model.revision)


def choose_plan(cfg: Config, model: ModelSource | None = None) -> Plan:
    """Join the run's other processes and build the `Plan`, checked against the model's config.json
    (`model`, read here when not given) before any weights are loaded."""
    init_distributed(cfg.parallel.distributed)
    arch = (model or open_model(cfg)).config
    if cfg.data.seq_len > arch.max_position_embeddings:
        raise UserError(
            f"data.seq_len {cfg.data.seq_len} is above the model's maximum of {arch.max_position_embeddings} "
            "positions (max_position_embeddings); lower data.seq_len"
        )
    plan = make_plan(cfg.parallel, cfg.train.batch_size, arch.num_kv_heads, num_experts=arch.num_experts)
    log.info("parallel: %s", plan.describe())
    return plan


class Base(NamedTuple):
    """The frozen base model, its weights on the devices."""

    params: dict  # placed by the plan (QuantizedTensor kernels with quant.weights)
    config: DecoderConfig
    path: Path  # the local folder (the tokenizer's default)
    name: str  # as configured (hub id or path): recorded in the adapter
    vocab_before: int  # the checkpoint's vocabulary; config.vocab_size is larger when tokens were added
    rows: dict | None = None  # then the rows drawn for them: {"embed": [k, D], "lm_head": [k, D] (untied)}


def load_base(cfg: Config, plan: Plan, vocab_size: int = 0, model: ModelSource | None = None) -> Base:
    """Load (and quantize, with `quant.weights`) the base model (`model`: its folder and config.json as
    `open_model` read them), grow its vocabulary to `vocab_size` (the tokenizer's, with
    `data.add_special_tokens`) when that is larger, then place it as the plan says; the host copy of the
    weights is dropped."""
    q = cfg.quant
    quantizer = None if q.weights == "none" else make_quantizer(q.weights, q.block_size, tuple(q.skip))
    with plan.host_loading():
        loaded = load_model(
            model or cfg.model.path,
            dtype=cfg.model.dtype,
            compute_dtype=cfg.model.compute_dtype,
            attention=cfg.model.attention,
            remat=cfg.train.remat,
            revision=cfg.model.revision,
            allow_pickle=cfg.model.allow_pickle,
            quantizer=quantizer,
            random_init_seed=cfg.seed if cfg.model.random_init else None,
        )
        before, rows = loaded.config.vocab_size, None
        if vocab_size > before:
            loaded, rows = grow_base(loaded, vocab_size, cfg.seed)
    return Base(plan.place_base(loaded.params), loaded.config, loaded.path, loaded.name_or_path, before, rows)


@dataclasses.dataclass
class Data:
    """The run's data, as this process reads it."""

    loader: BatchLoader | PairLoader  # this process's rows of every training batch, epoch after epoch
    val: Any  # validation examples (`Pairs` for DPO/ORPO), or None
    rows: tuple[int, int]  # `(index, count)`: the slice of each global batch this process reads
    total_steps: int
    feed: Any = None  # GRPO: the rollouts that make each step's batch (`jaxlora.train.grpo_feed`)

    def next_micro(self, cfg: Config, state, steps) -> tuple[list[dict], dict]:
        """The next step's micro-batches (this process's rows) and host metrics to log with the step's."""
        if self.feed is not None:
            return self.feed.micro(state, steps)
        return [next(self.loader) for _ in range(cfg.train.grad_accum_steps)], {}

    def eval_batches(self, cfg: Config) -> Iterator[dict]:
        """This process's rows of the validation batches, in order: `train.eval_batches` of them, or all."""
        index, count = self.rows
        loader = (PairLoader if isinstance(self.val, Pairs) else BatchLoader)(
            self.val,
            cfg.train.batch_size,
            cfg.data.seq_len,
            packing=cfg.data.packing,
            shuffle=False,
            num_epochs=1,
            prefetch=0,
            drop_last=False,
            seed=cfg.seed,
            process_index=index,
            process_count=count,
        )
        try:
            for i, batch in enumerate(loader):
                if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
                    break
                yield batch
        finally:
            loader.close()


def build_data(cfg: Config, tokenizer, plan: Plan) -> Data:
    """Tokenize the data sources and open the training batches (the rows of each batch this process's
    devices hold); the number of steps follows `train.max_steps` and `train.num_epochs`."""
    registered = OBJECTIVES[cfg.train.objective]
    index, count = plan.loader_slice()
    if cfg.train.objective == "grpo":  # prompts, completed by the run itself
        loader, val, feed, total = build_grpo_data(cfg, tokenizer, (index, count))
        return Data(loader, val, (index, count), total, feed)
    train_ex, val_ex = registered.build_data(cfg, tokenizer)
    loader = registered.loader(
        train_ex,
        cfg.train.batch_size,
        cfg.data.seq_len,
        packing=cfg.data.packing,
        shuffle=cfg.data.shuffle,
        seed=cfg.seed,
        num_epochs=None,
        process_index=index,
        process_count=count,
    )
    return Data(loader, val_ex, (index, count), _total_steps(cfg, loader))


def _total_steps(cfg: Config, loader: BatchLoader) -> int:
    t = cfg.train
    steps = []
    if t.max_steps is not None:
        steps.append(t.max_steps)
    if t.num_epochs is not None:
        per_epoch = loader.num_batches_per_epoch
        if per_epoch is None:
            raise UserError(
                "train.num_epochs needs a dataset of known length; use train.max_steps with streaming"
            )
        steps.append(max(1, math.ceil(t.num_epochs * per_epoch / t.grad_accum_steps)))
    return min(steps)
