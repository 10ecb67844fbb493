"""The pure training step: `train_step(lora, opt_state, base, batch, rng) -> (lora, opt_state, metrics)`.

Gradients exist for the LoRA tree only; the frozen base is an ordinary (non-differentiated) argument.
Micro-batches are scanned, their gradients summed and divided by the total number of target tokens, so
accumulation equals one large batch. A non-finite loss or gradient leaves the state unchanged and sets
`metrics["nonfinite"]`, which the loop reads at its logging interval.

The same step runs under every parallel strategy (`jaxlora.parallel`): under `jit` (single device or a
sharded mesh) XLA partitions it from the arrays' shardings; under `pmap` it is given `axis_name` and
`psum`s the gradient sums, loss sums and token counts over the devices before dividing, so the loss is
normalized by the total number of target tokens exactly as on one device.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.config import DecoderConfig
from jaxlora.models.decoder import forward
from jaxlora.train.loss import chunked_cross_entropy

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids")


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


def loss_and_count(lora, base, batch, lora_scale, rng, spec: StepSpec, train: bool = True):
    """(sum of token NLL, token count) for one batch of [B, T] arrays."""
    s, n, _ = loss_terms(lora, base, batch, lora_scale, rng, spec, train)
    return s, n


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


def keep_frozen(new: dict, old: dict) -> dict:
    """`new` with the adapter's fixed leaves ("s" per-module scales, trainable-token ids) from `old`:
    their gradient is 0, but AdamW's weight decay would still shrink them."""
    return jax.tree_util.tree_map_with_path(
        lambda path, n, o: o if getattr(path[-1], "key", None) in ("s", "token_ids") else n, new, old
    )


def make_train_step(
    spec: StepSpec, optimizer: optax.GradientTransformation, axis_name: str | None = None
) -> Callable:
    """Build `train_step(lora, opt_state, base, batch, rng, lora_scale)`; batch arrays are [A, B, T].

    `axis_name`: the `pmap` axis to reduce over (None under `jit`). Each device then sees its own rows
    [A, B / devices, T] and draws its own dropout masks.
    """

    def objective(lora, base, mb, scale, r):
        s, n, aux = loss_terms(lora, base, mb, scale, r, spec)
        return s + spec.aux_loss_coef * aux, (s, n, aux)

    value_grad = jax.value_and_grad(objective, has_aux=True)

    def train_step(lora, opt_state, base, batch, rng, lora_scale):
        accum = batch["input_ids"].shape[0]
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        rngs = jax.random.split(rng, accum)

        def micro(carry, xs):
            g_acc, s_acc, n_acc, aux_acc = carry
            mb, r = xs
            (_, (s, n, aux)), g = value_grad(lora, base, mb, lora_scale, r)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n, aux_acc + aux), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        f0 = jnp.float32(0)
        (g_sum, loss_sum, count, aux_sum), _ = jax.lax.scan(micro, (zeros, f0, f0, f0), (batch, rngs))
        if axis_name is not None:  # sums over all devices; a pmean of per-device means would be inexact
            g_sum, loss_sum, count, aux_sum = jax.lax.psum((g_sum, loss_sum, count, aux_sum), axis_name)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, lora)
        new_lora = keep_frozen(optax.apply_updates(lora, updates), lora)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(aux_sum)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "nonfinite": ~ok}
        if _with_aux(spec, True):  # the loss the gradient is of: loss + aux_loss_coef * aux_loss
            metrics["aux_loss"] = aux_sum / denom
        return keep(new_lora, lora), keep(new_opt, opt_state), metrics

    return train_step


def make_eval_step(spec: StepSpec, axis_name: str | None = None) -> Callable:
    """Build `eval_step(lora, base, batch, lora_scale) -> (loss_sum, count)` for a [B, T] batch.

    With `axis_name` (pmap) both sums are taken over all devices.
    """

    def eval_step(lora, base, batch, lora_scale):
        out = loss_and_count(lora, base, batch, lora_scale, None, spec, train=False)
        return out if axis_name is None else jax.lax.psum(out, axis_name)

    return eval_step
