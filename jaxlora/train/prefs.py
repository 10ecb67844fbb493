"""Preference tuning: the DPO (sigmoid, IPO, hinge) and ORPO losses, as the `Preference` objective.

The losses follow TRL (`DPOTrainer._compute_loss`, `ORPOTrainer.odds_ratio_loss`): log-probabilities are
summed over each response's tokens (ORPO and IPO divide by the response length), rewards are
`beta * (policy - reference)` log-ratios. ORPO's NLL term covers the whole chosen sequence, prompt
included, as TRL's `ORPOTrainer` computes it (`concatenated_forward`). The reference of DPO is the frozen
base with the adapter off, so there is no second model: one more forward pass of the same weights, under
`stop_gradient`. With `prefs.reference: initial_adapter` the steps take one more argument, `ref_lora`
(the frozen initial LoRA tree, shaped like `lora`): the reference pass is the base plus that adapter,
still no copy of the base.

Chosen and rejected sequences share one forward pass, stacked on the batch axis ([2B, T]). The steps are
`jaxlora.train.step`'s (the optional `ref_lora` is their trailing `extra` argument); the batch holds the
`PAIR_KEYS` arrays ([A, B, T] micro-batches). Gradient accumulation divides by the pairs (and, for ORPO's
NLL, the chosen sequences' tokens) of all micro-batches and devices (`Preference.totals`), so it equals
one large batch.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxlora.data import IGNORE, PAIR_KEYS
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.decoder import cap_logits, forward, lm_head_kernel
from jaxlora.train.objective import Objective, StepSpec

DPO_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)  # fmt: skip
ORPO_METRICS = DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclasses.dataclass(frozen=True)
class PrefSpec:
    """Static settings of the preference step (from `train.objective` and the `prefs` section)."""

    objective: str  # "dpo" or "orpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    orpo_alpha: float = 0.1

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ORPO_METRICS if self.objective == "orpo" else DPO_METRICS


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def dpo_loss(spec: PrefSpec, pc, pr, rc, rr, nc, nr) -> tuple[jax.Array, dict]:
    """Per-pair DPO loss [B] and per-pair metrics, from summed log-probs [B] of the policy (pc, pr),
    the reference (rc, rr) and the response lengths (nc, nr)."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    b = spec.beta
    if spec.loss_type == "sigmoid":  # cDPO with label smoothing; plain DPO at 0
        ls = spec.label_smoothing
        loss = -(1 - ls) * jax.nn.log_sigmoid(b * delta) - ls * jax.nn.log_sigmoid(-b * delta)
    elif spec.loss_type == "hinge":
        loss = jax.nn.relu(1 - b * delta)
    elif spec.loss_type == "ipo":  # log-ratios averaged over the response tokens, as TRL
        avg = chosen_ratio / jnp.maximum(nc, 1.0) - rejected_ratio / jnp.maximum(nr, 1.0)
        loss = (avg - 1 / (2 * b)) ** 2
    else:
        raise ValueError(f"unknown loss_type {spec.loss_type!r}")
    return loss, pair_metrics(b * chosen_ratio, b * rejected_ratio, pc, pr)


def pair_metrics(reward_chosen, reward_rejected, logps_chosen, logps_rejected) -> dict:
    """TRL's per-pair metrics [B] from the rewards and log-probs of chosen and rejected (no gradient)."""
    rc, rr, pc, pr = jax.lax.stop_gradient((reward_chosen, reward_rejected, logps_chosen, logps_rejected))
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).astype(jnp.float32),
        "rewards/margins": rc - rr,
        "logps/chosen": pc,
        "logps/rejected": pr,
    }


def orpo_loss(spec: PrefSpec, pc, pr, nc, nr) -> tuple[jax.Array, dict]:
    """Per-pair odds-ratio term `-alpha * log sigmoid(log odds)` [B] (ORPO adds the NLL of the chosen
    tokens) and per-pair metrics; log-probs are averaged over the response tokens, as TRL."""
    ac, ar = pc / jnp.maximum(nc, 1.0), pr / jnp.maximum(nr, 1.0)
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    ratio = jax.nn.log_sigmoid(log_odds)
    a = spec.orpo_alpha
    metrics = pair_metrics(a * ac, a * ar, ac, ar)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)
    return -a * ratio, metrics


def next_tokens(ids: jax.Array, seg: jax.Array) -> jax.Array:
    """[N, T] the token that follows each position inside its sequence, IGNORE where none does."""
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    nxt = jnp.where(same, ids[:, 1:], IGNORE)
    return jnp.pad(nxt, ((0, 0), (0, 1)), constant_values=IGNORE)


def sequence_logps(params, cfg, hidden: jax.Array, targets: jax.Array, nxt: jax.Array):
    """(response sums [N], response counts [N], whole-sequence sums [N]) of target log-probs per row of
    hidden [N, T, D]; `targets` [N, T] are the response targets, `nxt` [N, T] every next token.

    One row's [T, V] logits at a time (scanned, recomputed in the backward pass)."""
    w = lm_head_kernel(params, cfg)  # [D, V]
    dt = jnp.dtype(cfg.runtime.compute_dtype)

    @jax.checkpoint
    def row(h, t, n):  # [T, D], [T], [T] -> two scalars
        logits = cap_logits(jnp.einsum("td,dv->tv", h.astype(dt), w, preferred_element_type=jnp.float32), cfg)
        resp, seq = t != IGNORE, (t != IGNORE) | (n != IGNORE)
        tok = jnp.where(resp, t, jnp.where(seq, n, 0))
        logp = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(jnp.where(resp, logp, 0.0)), jnp.sum(jnp.where(seq, logp, 0.0))

    sums, seq_sums = jax.lax.map(lambda xs: row(*xs), (hidden, targets, nxt))
    return sums, jnp.sum(targets != IGNORE, axis=-1).astype(jnp.float32), seq_sums


def _stacked(batch: dict, key: str) -> jax.Array:
    return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)  # [2B, T]


def pair_terms(
    lora, base, batch, lora_scale, rng, spec: StepSpec, prefs: PrefSpec, train: bool = True, ref_lora=None
):
    """(objective sums, per-pair metrics, valid [B]) for one [B, T] batch of pairs.

    The objective sums are `loss_sum` (over valid pairs) and, for ORPO, `nll_sum` (over the chosen
    sequences' tokens, prompt included, as TRL); `chosen_tokens` counts those tokens. `ref_lora`: DPO's
    frozen reference adapter, None for the base with the adapter off.
    """
    ids, pos, seg, tgt = (_stacked(batch, k) for k in ("input_ids", "positions", "segment_ids", "targets"))
    params, lo = with_embeddings(base, lora)
    hidden = forward(
        params, spec.model, ids, pos, seg, lora=lo, lora_scale=lora_scale,
        lora_dropout=spec.lora_dropout if train else 0.0,
        dropout_rng=rng if train and spec.lora_dropout > 0 else None, return_hidden=True,
    )  # fmt: skip
    nxt = next_tokens(ids, seg)  # [2B, T]
    logps, counts, seq_logps = sequence_logps(params, spec.model, hidden, tgt, nxt)  # [2B]
    b = batch["chosen_input_ids"].shape[0]
    pc, pr, nc, nr = logps[:b], logps[b:], counts[:b], counts[b:]
    valid = (nc > 0) & (nr > 0)  # padding rows of a last eval batch have no response
    if prefs.objective == "orpo":
        per_pair, metrics = orpo_loss(prefs, pc, pr, nc, nr)
        nll_sum = -jnp.sum(jnp.where(valid, seq_logps[:b], 0.0))
    else:  # the reference: the frozen base, adapter off (or the frozen initial adapter), no gradient
        r_params, r_lo = base, None
        if ref_lora is not None:
            r_params, r_lo = with_embeddings(base, jax.lax.stop_gradient(ref_lora))
        ref_hidden = forward(
            r_params, spec.model, ids, pos, seg, lora=r_lo, lora_scale=lora_scale, return_hidden=True
        )
        ref, _, _ = sequence_logps(r_params, spec.model, jax.lax.stop_gradient(ref_hidden), tgt, nxt)
        ref = jax.lax.stop_gradient(ref)
        per_pair, metrics = dpo_loss(prefs, pc, pr, ref[:b], ref[b:], nc, nr)
        nll_sum = jnp.float32(0)
    loss_sum = jnp.sum(jnp.where(valid, per_pair, 0.0))
    seq_tokens = jnp.sum(nxt[:b] != IGNORE, axis=-1).astype(jnp.float32)  # [B]
    chosen_tokens = jnp.sum(jnp.where(valid, seq_tokens, 0.0))
    return {"loss_sum": loss_sum, "nll_sum": nll_sum, "chosen_tokens": chosen_tokens}, (metrics, valid)


@dataclasses.dataclass(frozen=True)
class Preference(Objective):
    """DPO or ORPO on [A, B, T] micro-batches of pairs (`PAIR_KEYS`); the loss is the mean over all pairs
    of the optimizer step (ORPO: plus the NLL per chosen token). `*extra` may hold DPO's reference
    adapter (`ref_lora`)."""

    spec: StepSpec
    prefs: PrefSpec
    batch_keys: tuple[str, ...] = PAIR_KEYS

    @property
    def sum_names(self) -> tuple[str, ...]:
        return self.prefs.metric_names

    def totals(self, batch: dict) -> dict:
        c_ok = batch["chosen_targets"] != IGNORE
        r_ok = batch["rejected_targets"] != IGNORE
        c_seq = jax.vmap(next_tokens)(batch["chosen_input_ids"], batch["chosen_segment_ids"]) != IGNORE
        return {
            "pairs": jnp.sum(c_ok.any(-1) & r_ok.any(-1), dtype=jnp.float32),  # over [A, B]
            "tokens": jnp.sum(c_ok, dtype=jnp.float32) + jnp.sum(r_ok, dtype=jnp.float32),
            "chosen_tokens": jnp.sum(c_seq, dtype=jnp.float32),  # ORPO's NLL: the whole chosen sequences
        }

    def loss(self, lora, base, mb, lora_scale, rng, totals, ref_lora=None):
        n_pairs, n_chosen = jnp.maximum(totals["pairs"], 1.0), jnp.maximum(totals["chosen_tokens"], 1.0)
        sums, (metrics, valid) = pair_terms(
            lora, base, mb, lora_scale, rng, self.spec, self.prefs, ref_lora=ref_lora
        )
        value = sums["loss_sum"] / n_pairs + sums["nll_sum"] / n_chosen
        msum = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()}
        if self.prefs.objective == "orpo":  # per chosen token, as the loss (and TRL)
            msum["nll_loss"] = jax.lax.stop_gradient(sums["nll_sum"]) * n_pairs / n_chosen
        return value, msum

    def finish(self, value, sums, totals):
        n_pairs = jnp.maximum(totals["pairs"], 1.0)
        metrics = {"loss": value, "tokens": totals["tokens"]}
        metrics.update({k: v / n_pairs for k, v in sums.items()})
        return jnp.float32(1), metrics, (value,)

    def eval_sums(self, lora, base, batch, lora_scale, ref_lora=None):
        """{name: sum over the batch's pairs, "count": pairs} for a [B, T] batch of pairs."""
        sums, (metrics, valid) = pair_terms(
            lora, base, batch, lora_scale, None, self.spec, self.prefs, train=False, ref_lora=ref_lora
        )
        out = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()}
        out.update(loss_sum=sums["loss_sum"], nll_sum=sums["nll_sum"], chosen_tokens=sums["chosen_tokens"])
        out["count"] = jnp.sum(valid, dtype=jnp.float32)
        return out

    def eval_result(self, out):
        """`loss` is the batch's loss times its pairs, so the pair-weighted mean of batch losses comes out
        (the loop divides the sums over all batches by the total count)."""
        out = dict(out)
        nll = out.pop("nll_sum") / jnp.maximum(out.pop("chosen_tokens"), 1.0)
        out["loss"] = out.pop("loss_sum") + nll * out["count"]
        if self.prefs.objective == "orpo":
            out["nll_loss"] = nll * out["count"]
        return out
