"""The `grpo:` section (`train.objective: grpo`): TRL's `GRPOConfig` names and defaults for what jaxlora
runs, and the reward functions it calls (`jaxlora.train.rewards`); docs/rl.md explains each knob.

A reward function is written as a string, `path/to/file.py:function`, `package.module:function` or
`jaxlora:<built-in>`, or as a mapping that also binds keyword arguments (a built-in's settings):

    grpo:
      reward_funcs:
        - rewards.py:brevity
        - {name: jaxlora:exact_answer, args: {extract: boxed}}
      reward_weights: [0.5, 1.0]
"""

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from jaxlora.schema import Bool, Float, Int, Invalid, NonBlank, Section, Str, listing

__all__ = ["GrpoSection", "RewardFunc"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALAR = (str, int, float, bool, type(None))


class _Args(dict):
    """Read-only, hashable keyword arguments of a reward function (a `Config` hashes as a whole)."""

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("reward function arguments are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (_Args, (dict(self),))


def _frozen_args(args: dict) -> _Args:
    """Scalars, or lists of scalars (kept as tuples); anything else is refused."""
    out = {}
    for name, value in args.items():
        value = tuple(value) if isinstance(value, list | tuple) else value
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, SCALAR) for v in items):
            raise Invalid("{key}.{name}: expected a number, string, boolean or a list of them", name=name)
        out[name] = value
    return _Args(out)


Args = Annotated[dict[Str, Any], AfterValidator(_frozen_args)]


class RewardFunc(Section):
    """One reward function of `grpo.reward_funcs`, with keyword arguments bound to it."""

    _prefix = "grpo.reward_funcs[i]"

    name: NonBlank = Field(
        description="path/to/file.py:function, package.module:function or jaxlora:<built-in> "
        "(exact_answer, format_reward, length_penalty)"
    )
    args: Args = Field(default_factory=lambda: _Args(), description="keyword arguments bound to the function")

    @field_validator("name")
    @classmethod
    def _has_a_function(cls, name: str) -> str:
        where, _, function = name.rpartition(":")
        if not where.strip() or not function.strip():
            raise Invalid(
                "{key}: {spec!r} names no function; write path/to/file.py:function, "
                "package.module:function or jaxlora:exact_answer",
                spec=name,
            )
        return name


def _reward_entry(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class GrpoSection(Section):
    """Online RL with group-relative advantages (`train.objective: grpo`); docs/rl.md."""

    _prefix = "grpo"

    num_generations: Int = Field(
        8, ge=2, description="completions sampled per prompt (G, the group whose rewards are compared)"
    )
    max_prompt_length: Int | None = Field(
        None, ge=1, description="keep only the last N tokens of each prompt; null = no limit"
    )
    max_completion_length: Int = Field(
        512, ge=1, description="most tokens sampled per completion (and dr_grpo's loss constant)"
    )
    temperature: Float = Field(
        1.0, gt=0, description="sampling temperature; the loss's log-probs use the same scaled logits"
    )
    top_p: Float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the top tokens of this mass")
    top_k: Int = Field(0, ge=0, description="sample among the k most likely tokens; 0 = all")
    min_p: Float | None = Field(
        None,
        ge=0,
        le=1,
        description="keep tokens of at least min_p x the top token's probability; null = off",
    )
    repetition_penalty: Float = Field(
        1.0, gt=0, description="tokens already in the prompt or answer: logit / this (x this if < 0); 1 = off"
    )
    beta: Float = Field(
        0.0, ge=0, description="weight of the KL to the reference (the adapter off); 0 = no reference pass"
    )
    epsilon: Float = Field(0.2, ge=0, description="clip the importance ratio below at 1 - epsilon")
    epsilon_high: Float | None = Field(
        None, ge=0, description="clip above at 1 + epsilon_high (cispo: the ratio's cap); null = epsilon"
    )
    delta: Float | None = Field(
        None, gt=0, description="two-sided clipping: also cap the unclipped ratio at delta; null = off"
    )
    num_iterations: Int = Field(
        1, ge=1, description="optimizer steps on each batch of completions (mu), ratios to the sampler's"
    )
    loss_type: Literal[LOSS_TYPES] = Field(
        "dapo",
        description="how token losses are combined: grpo (per completion), bnpo (per micro-batch token), "
        "dr_grpo (per max_completion_length), dapo (per token of the batch), cispo, sapo, luspo, vespo",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the std of the group's rewards, the batch's, or none"
    )
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="several rewards: weigh and sum, then normalize; or normalize each per group, then sum",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="importance ratio per token, or per completion (GSPO: mean log-ratio)"
    )
    mask_truncated_completions: Bool = Field(
        False, description="completions cut at max_completion_length count nothing in the loss"
    )
    use_bias_correction_kl: Bool = Field(
        True, description="multiply the KL term by the importance ratio (unbiased off-policy KL gradient)"
    )
    off_policy_mask_threshold: Float | None = Field(
        None,
        gt=0,
        description="drop completions with negative advantage whose mean KL to the sampler exceeds this; "
        "null = keep all",
    )
    top_entropy_quantile: Float = Field(
        1.0,
        gt=0,
        le=1,
        description="the policy loss keeps only this top share of tokens by entropy (paper: 0.2); 1 = all",
    )
    entropy_coef: Float = Field(
        0.0, description="entropy bonus: subtract this times the mean token entropy from the loss; 0 = off"
    )
    sapo_temperature_pos: Float = Field(1.0, gt=0, description="sapo: gate temperature, positive advantages")
    sapo_temperature_neg: Float = Field(1.05, gt=0, description="sapo: gate temperature, other advantages")
    vespo_k_pos: Float = Field(2.0, description="vespo: power of the weight, positive advantages")
    vespo_lambda_pos: Float = Field(3.0, description="vespo: decay of the weight, positive advantages")
    vespo_k_neg: Float = Field(3.0, description="vespo: power of the weight, negative advantages")
    vespo_lambda_neg: Float = Field(2.0, description="vespo: decay of the weight, negative advantages")
    reward_funcs: listing(RewardFunc) = Field(
        (), description="reward functions: file.py:function, module:function or jaxlora:<built-in>"
    )
    reward_weights: listing(Float) | None = Field(
        None, description="one weight per reward function; null = 1.0 each"
    )

    @field_validator("reward_funcs", mode="before")
    @classmethod
    def _strings_are_names(cls, value: Any) -> Any:
        if isinstance(value, str | Mapping):
            value = [value]
        return [_reward_entry(v) for v in value] if isinstance(value, list | tuple) else value

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _booleans_as_trl(cls, value: Any) -> Any:
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_weight_per_function(self) -> "GrpoSection":
        w, f = self.reward_weights, self.reward_funcs
        if w is not None and len(w) != len(f):
            raise Invalid(
                "{reward_weights} has {n} weights for {m} reward functions; give one weight per function",
                n=len(w),
                m=len(f),
            )
        return self

    def check_run(self, batch_size: int, grad_accum_steps: int) -> None:
        """Raise `Invalid` unless a run can use this section: reward functions given, and the completions
        of an optimizer step (batch_size x grad_accum_steps) make whole groups of num_generations."""
        if not self.reward_funcs:
            raise Invalid("train.objective is grpo but grpo.reward_funcs is empty; name a reward function")
        n = batch_size * grad_accum_steps
        if n % self.num_generations:
            raise Invalid(
                "train.batch_size x train.grad_accum_steps = {n} completions per step is not divisible by "
                "grpo.num_generations = {g}; make it a multiple of {g} (each prompt gets {g} completions)",
                n=n,
                g=self.num_generations,
            )
