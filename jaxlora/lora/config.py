"""`LoraConfig`: the adapter options, with PEFT's names and meanings (the `lora:` section of a run)."""

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from jaxlora.schema import Bool, Float, Int, Invalid, NonBlank, Section, Str, listing

__all__ = ["LoraConfig"]


class _Patterns(dict):
    """A read-only, hashable {module-name pattern: value} (the config is frozen and hashable)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("LoraConfig patterns are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (_Patterns, (dict(self),))


def _patterns(value: Any) -> Any:
    if isinstance(value, Mapping):
        for key in value:
            try:
                re.compile(key)
            except re.error as err:
                raise Invalid("{key} has an invalid regex {k!r} ({err})", k=key, err=err) from None
        return _Patterns(value)
    return value


class LoraConfig(Section):
    """The LoRA adapters: `W x + (alpha / r) * B A dropout(x)`."""

    _prefix = "lora"

    r: Int = Field(8, ge=1, description="rank of each adapter")
    alpha: Float = Field(
        16.0,
        gt=0,
        description="scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)",
    )
    dropout: Float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input, in [0, 1)")
    target_modules: Str | tuple[Str, ...] = Field(
        "all-linear",
        description="list of module names (q_proj, ...), a regex full-matched against HF module paths, "
        "or all-linear",
    )
    target_parameters: listing(Str) | None = Field(
        None,
        description="MoE weights adapted as PEFT's target_parameters: mlp.experts.gate_up_proj, "
        "mlp.experts.down_proj, the router (mlp.gate.weight; gpt-oss: mlp.router.weight); a rank-r pair per "
        "expert",
    )
    use_rslora: Bool = Field(False, description="rank-stabilized LoRA: scale by alpha / sqrt(r)")
    init: Str = Field(
        "default",
        description="default (A Kaiming uniform, as PEFT) or gaussian (A std 1/r), B = 0; or pissa, "
        "pissa_niter_N, olora: A and B from the base weights' SVD/QR, the base keeps the residual (PEFT)",
    )
    layers_to_transform: listing(Int) | None = Field(
        None, description="decoder layer indices to adapt; null = all"
    )
    use_dora: Bool = Field(
        False, description="DoRA: a trained magnitude per output times the direction of W + scale * B A"
    )
    lora_bias: Bool = Field(
        False, description="a trained bias on lora_B, as PEFT's lora_bias (only layers with a bias)"
    )
    trainable_token_indices: listing(Int | NonBlank) | None = Field(
        None,
        description="token ids, or token texts such as data.add_special_tokens, whose input-embedding rows "
        "train (PEFT trainable tokens; tied: the head too)",
    )
    modules_to_save: listing(Str) | None = Field(
        None,
        description="[embed_tokens, lm_head] (GPT-2: wte): train full copies of them, as PEFT (tied: one)",
    )
    rank_pattern: Annotated[dict[Str, Int], AfterValidator(_patterns)] = Field(
        _Patterns(),
        description="per-module r: {regex matched against the end of HF module names: r}, as in PEFT",
    )
    alpha_pattern: Annotated[dict[Str, Float], AfterValidator(_patterns)] = Field(
        _Patterns(),
        description="per-module alpha: {regex matched against the end of HF module names: alpha}, as in PEFT",
    )
    init_from: Str | None = Field(
        None,
        description="start from this adapter instead of a fresh one: a PEFT adapter folder, or a jaxlora run "
        "folder (its latest checkpoint, else its adapter/); r, alpha and targets must match",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, targets: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(targets, str):
            if not targets.strip():
                raise Invalid("{key} must not be empty; use all-linear, a list of names or a regex")
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as err:
                    raise Invalid(
                        "{key} is not a valid regex ({err}): {targets!r}", err=err, targets=targets
                    ) from None
        elif any(not t.strip() for t in targets):  # empty: only with target_parameters (checked below)
            raise Invalid("{key} must be a non-empty list of module names, got {names}", names=list(targets))
        return targets

    @model_validator(mode="after")
    def _something_targeted(self) -> "LoraConfig":
        if not self.target_modules and not self.target_parameters:
            raise Invalid(
                "{key} must be a non-empty list of module names (or set target_parameters), got []",
                at="target_modules",
            )
        return self

    @model_validator(mode="after")
    def _init_from_plain(self) -> "LoraConfig":
        if self.init_from is not None and self.init not in ("default", "gaussian"):
            raise Invalid(
                "{key} starts from a trained adapter; lora.init {init} would change the base weights, "
                "use lora.init=default",
                at="init_from",
                init=self.init,
            )
        return self

    @field_validator("init")
    @classmethod
    def _init(cls, init: str) -> str:
        if init not in ("default", "gaussian", "pissa", "olora") and not re.fullmatch(
            r"pissa_niter_\d+", init
        ):
            raise Invalid(
                "{key} must be default, gaussian, pissa, pissa_niter_N (N subspace iterations) or olora, "
                "got {init!r}",
                init=init,
            )
        return init

    @field_validator("rank_pattern")
    @classmethod
    def _ranks(cls, ranks: dict) -> dict:
        bad = {k: v for k, v in ranks.items() if v < 1}
        if bad:
            raise Invalid("{key} ranks must be >= 1, got {bad}", bad=bad)
        return ranks

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas(cls, alphas: dict) -> dict:
        bad = {k: v for k, v in alphas.items() if v <= 0}
        if bad:
            raise Invalid("{key} alphas must be > 0, got {bad}", bad=bad)
        return alphas

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise Invalid(
                "{key} must be null (all layers) or a non-empty list of layer indices >= 0, got {layers}",
                layers=list(layers),
            )
        return layers
