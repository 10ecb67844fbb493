"""`train.objective` -> its objective, its data builder and its batch loader: the one table a new
objective is added to (besides its own module; see `jaxlora.train.objective`)."""

import dataclasses
from collections.abc import Callable

from jaxlora.config import Config
from jaxlora.data import BatchLoader, PairLoader, build_datasets, build_pairs
from jaxlora.data.prompts import PromptLoader, build_prompts
from jaxlora.models.config import DecoderConfig
from jaxlora.train.grpo import Grpo, GrpoSpec
from jaxlora.train.objective import Objective, StepSpec
from jaxlora.train.prefs import Preference, PrefSpec
from jaxlora.train.sft import Sft


@dataclasses.dataclass(frozen=True)
class Registered:
    make: Callable[[Config, StepSpec], Objective]  # the objective for this run's config
    build_data: Callable  # (cfg, tokenizer) -> (training examples, validation examples or None)
    loader: type  # BatchLoader or PairLoader: examples -> [B, T] batches (GRPO: prompts, see grpo_feed)


def _preference(cfg: Config, spec: StepSpec) -> Preference:
    p = cfg.prefs
    return Preference(
        spec, PrefSpec(cfg.train.objective, p.beta, p.loss_type, p.label_smoothing, p.orpo_alpha)
    )


def _pairs(cfg: Config, tokenizer):  # one pair per row of both sides (no packing)
    return build_pairs(cfg.data, tokenizer, cfg.seed, cfg.prefs.max_prompt_length)


OBJECTIVES = {
    "sft": Registered(
        lambda cfg, spec: Sft(spec), lambda cfg, tok: build_datasets(cfg.data, tok, cfg.seed), BatchLoader
    ),
    "dpo": Registered(_preference, _pairs, PairLoader),
    "orpo": Registered(_preference, _pairs, PairLoader),
    # GRPO's batches are its own rollouts: `jaxlora.train.grpo_feed` builds them each step
    "grpo": Registered(
        lambda cfg, spec: Grpo(spec, GrpoSpec.from_section(cfg.grpo)),
        lambda cfg, tok: build_prompts(cfg.data, tok, cfg.seed, cfg.grpo.max_prompt_length),
        PromptLoader,
    ),
}


def objective_for(cfg: Config, model: DecoderConfig) -> Objective:
    """The run's objective on `model` (its `Runtime` set as the run loads it): the step's static parts
    from the config, as the run compiles them (`jaxlora.train.loop.compile_steps`, `jaxlora plan`)."""
    model = model.with_runtime(packed=cfg.data.packing)  # static: may attention kernels see packing?
    aux = model.router_aux_loss_coef if cfg.train.moe_aux_loss else 0.0  # MoE load balancing, as HF
    spec = StepSpec(model, cfg.lora.dropout, cfg.train.loss_chunk_size, aux)
    return OBJECTIVES[cfg.train.objective].make(cfg, spec)
