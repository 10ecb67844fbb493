"""Supervised fine-tuning: next-token cross-entropy on the target tokens, normalized by their count.

Micro-batches' loss sums and token counts are summed, then divided once by the total number of target
tokens (over all micro-batches and devices), so accumulation equals one large batch. MoE models may add
the load-balancing loss (`StepSpec.aux_loss_coef`), reported as `aux_loss`.
"""

import dataclasses

import jax.numpy as jnp

from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.decoder import forward
from jaxlora.train.loss import chunked_cross_entropy
from jaxlora.train.objective import Objective, StepSpec

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids")


def _with_aux(spec: StepSpec, train: bool) -> bool:
    return train and spec.aux_loss_coef > 0 and spec.model.num_experts > 0


def loss_terms(lora, base, batch, lora_scale, rng, spec: StepSpec, train: bool = True):
    """(sum of token NLL, token count, MoE aux loss times the count, 0 when off) for one batch."""
    base, lora = with_embeddings(base, lora)  # trainable token rows, if any, into the embedding
    out = forward(
        base,
        spec.model,
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        lora=lora,
        lora_scale=lora_scale,
        lora_dropout=spec.lora_dropout if train else 0.0,
        dropout_rng=rng if train and spec.lora_dropout > 0 else None,
        return_hidden=True,
        return_aux_loss=_with_aux(spec, train),
    )
    hidden, aux = out if _with_aux(spec, train) else (out, jnp.float32(0))
    s, n = chunked_cross_entropy(base, spec.model, hidden, batch["targets"], spec.loss_chunk)
    return s, n, aux * n


def loss_and_count(lora, base, batch, lora_scale, rng, spec: StepSpec, train: bool = True):
    """(sum of token NLL, token count) for one batch of [B, T] arrays."""
    s, n, _ = loss_terms(lora, base, batch, lora_scale, rng, spec, train)
    return s, n


@dataclasses.dataclass(frozen=True)
class Sft(Objective):
    spec: StepSpec
    batch_keys: tuple[str, ...] = BATCH_KEYS
    sum_names: tuple[str, ...] = ("loss", "tokens", "aux_loss")

    def loss(self, lora, base, mb, lora_scale, rng, totals, *extra):
        s, n, aux = loss_terms(lora, base, mb, lora_scale, rng, self.spec)
        return s + self.spec.aux_loss_coef * aux, {"loss": s, "tokens": n, "aux_loss": aux}

    def finish(self, value, sums, totals):
        denom = jnp.maximum(sums["tokens"], 1.0)
        metrics = {"loss": sums["loss"] / denom, "tokens": sums["tokens"]}
        if _with_aux(self.spec, True):  # the loss the gradient is of: loss + aux_loss_coef * aux_loss
            metrics["aux_loss"] = sums["aux_loss"] / denom
        return denom, metrics, (metrics["loss"], sums["aux_loss"])

    def eval_sums(self, lora, base, batch, lora_scale, *extra):
        return loss_and_count(lora, base, batch, lora_scale, None, self.spec, train=False)
