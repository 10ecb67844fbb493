"""What a training objective is to the one train step and the one eval step (`jaxlora.train.step`).

The step owns what every objective shares: the scan over micro-batches, the reduction across devices
(`jaxlora.parallel.Collective`), the optax update, the frozen leaves and the finite guard. An objective
owns its loss and its metrics:

    totals(batch)                       normalizers over the whole optimizer batch [A, B, ...], computed
                                        before the scan (pairs, tokens); the step sums them over devices
    loss(lora, base, mb, scale, rng, totals, *extra) -> (value, sums)
                                        one micro-batch: the scalar whose gradient is taken, and the
                                        float32 scalar sums named `sum_names` (summed over micro-batches
                                        and devices by the step)
    finish(value, sums, totals) -> (denominator, metrics, checked)
                                        the gradient is divided by `denominator`; `metrics` are what the
                                        step reports; every `checked` value must be finite to update
    eval_sums(lora, base, batch, scale, *extra) / eval_result(sums)
                                        one validation batch: sums (summed over devices), then what
                                        `jaxlora.train.loop.evaluate` reads: (loss_sum, count) or a dict
                                        of sums with their weight under "count"

`*extra` are frozen trees the steps take after `lora_scale` (DPO's reference adapter). An objective that
needs inputs computed outside the gradient each step (GRPO's rollouts, old and reference log-probs)
names them in its `batch_keys`: the loop computes them and the step only reads them. `updates_per_batch`
(GRPO's several optimizer steps on one batch of rollouts) is honoured by the run's feed
(`jaxlora.train.grpo_feed`); SFT, DPO and ORPO take 1.
`jaxlora.train.registry` maps `train.objective` to the objective, its data builder and its loader.
"""

import dataclasses

from jaxlora.models.config import DecoderConfig


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static parts of the step: the model config, LoRA dropout and the loss chunk size.

    `model.packed` (from `data.packing`) tells `model.attention: auto` whether rows may hold several
    examples, which rules cuDNN attention out.
    """

    model: DecoderConfig
    lora_dropout: float = 0.0
    loss_chunk: int = 1024
    # MoE: weight of the load-balancing loss added in training (HF's router_aux_loss_coef with
    # output_router_logits); 0 = off. With it the step also reports metrics["aux_loss"].
    aux_loss_coef: float = 0.0


class Objective:
    """The interface above; subclasses are frozen dataclasses holding a `spec: StepSpec`."""

    spec: StepSpec
    batch_keys: tuple[str, ...] = ()
    sum_names: tuple[str, ...] = ()  # the keys of `loss`'s sums
    updates_per_batch: int = 1

    def totals(self, batch: dict) -> dict:
        return {}

    def loss(self, lora, base, mb, lora_scale, rng, totals, *extra):
        raise NotImplementedError

    def finish(self, value, sums, totals):
        raise NotImplementedError

    def eval_sums(self, lora, base, batch, lora_scale, *extra):
        raise NotImplementedError

    def eval_result(self, sums):
        return sums
