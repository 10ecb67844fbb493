"""`LoraConfig`: the adapter options, with PEFT's names and meanings (the `lora:` section of a run)."""

import re
from typing import Literal

from pydantic import Field, field_validator

from jaxlora.schema import Bool, Float, Int, Invalid, Section, Str, listing

__all__ = ["LoraConfig"]


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
    use_rslora: Bool = Field(False, description="rank-stabilized LoRA: scale by alpha / sqrt(r)")
    init: Literal["default", "gaussian"] = Field(
        "default", description="A init: default (Kaiming uniform, as PEFT) or gaussian (std 1/r); B = 0"
    )
    layers_to_transform: listing(Int) | None = Field(
        None, description="decoder layer indices to adapt; null = all"
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
        elif not targets or any(not t.strip() for t in targets):
            raise Invalid("{key} must be a non-empty list of module names, got {names}", names=list(targets))
        return targets

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise Invalid(
                "{key} must be null (all layers) or a non-empty list of layer indices >= 0, got {layers}",
                layers=list(layers),
            )
        return layers
