"""GRPO and its variants (DAPO, Dr. GRPO, BNPO, GSPO, CISPO, SAPO, LUSPO, VESPO): the loss of TRL's
`GRPOTrainer._compute_loss` on completions sampled outside the gradient, as the `Grpo` objective.

Per completion token t of completion i, with A_i its advantage (`jaxlora.train.advantages`), r = p / p_old
the importance ratio (per token, or with `importance_sampling_level: sequence` exp of the mean log-ratio
of the completion, GSPO) and p_old the sampling policy's probability (the current one, detached, unless
`num_iterations` > 1 takes several steps on one batch):

    loss_t = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)  +  beta * KL_t
    KL_t   = exp(ref - logp) - (ref - logp) - 1      (k3, to the reference: the base with the adapter off;
                                                     times r with use_bias_correction_kl, as TRL)

(cispo, sapo and vespo replace the clipped term, as TRL does). Log-probabilities are those of the
temperature-scaled logits (TRL divides the logits by `temperature`). `loss_type` says how token losses
become the loss, over the whole optimizer batch (every micro-batch and device, through `totals`, so
accumulation and data parallelism equal one large batch):

    grpo, sapo    mean over completions of each completion's token mean
    dapo, cispo, vespo
                  sum over tokens / tokens in the batch
    dr_grpo       sum over tokens / (completions x max_completion_length)
    luspo         sum over tokens / completions
    bnpo          mean over micro-batches of each micro-batch's token mean (as TRL: depends on the split)

Entropy, as TRL: with `top_entropy_quantile` q < 1 the policy term (not the KL) counts only on the loss
tokens whose entropy H_t is >= the (1 - q) quantile of the loss tokens' entropies (linear interpolation,
as torch.quantile; padding is neither counted nor kept). The quantile spans one micro-batch, as TRL's
spans its micro-batch gathered over processes: under `jit` (one device or a mesh) that micro-batch's
rows on every device, so data parallelism equals one device; under `pmap` each device's rows. With
`entropy_coef` c != 0 the entropy bonus (H_t with its gradient) is subtracted, a token mean per
micro-batch over the kept tokens whatever the loss_type (so, as bnpo, it depends on the split):

    loss  -=  c * mean over micro-batches of (sum of H_t over kept tokens / kept tokens)

Batch (the step's [A, B, ...] micro-batches; B completions, T = P + C):

    input_ids        [B, T] int32    the prompt left-padded to P, then the completion right-padded to C
    positions        [B, T] int32    0, 1, ... over each row's real tokens
    segment_ids      [B, T] int32    1 on real tokens, 0 on padding
    completion_mask  [B, C] float32  1 on the completion's tokens through its first EOS (0 everywhere for a
                                     truncated one with mask_truncated_completions)
    advantages       [B] float32
    old_logps        [B, C] float32  with num_iterations > 1: `completion_logps` of the sampling adapter
    ref_logps        [B, C] float32  with beta > 0: `completion_logps` with the adapter off

`grpo_batch` builds them from TRL-shaped prompt and completion arrays. Metrics carry TRL's names: `kl`,
`entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`, `cispo_clip_ratio`,
`vespo/phi_seq_mean` (means over the batch's tokens, or completions for per-completion values); with
`entropy_coef` != 0 also `policy_loss` (the loss without the bonus) and, in training, `entropy_coef`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.decoder import cap_logits, forward, lm_head_kernel
from jaxlora.train.objective import Objective, StepSpec

__all__ = [
    "BATCH_KEYS",
    "Grpo",
    "GrpoSpec",
    "batch_loss",
    "completion_logps",
    "grpo_batch",
    "high_entropy_mask",
    "policy_terms",
]

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "completion_mask", "advantages")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
OTHER_METRICS = {"cispo": ("cispo_clip_ratio",), "vespo": ("vespo/phi_seq_mean",)}


@dataclasses.dataclass(frozen=True)
class GrpoSpec:
    """Static settings of the GRPO loss (the `grpo` section's, TRL's names and defaults)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon
    delta: float | None = None
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    max_completion_length: int = 512
    num_iterations: int = 1
    use_bias_correction_kl: bool = True
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)  # k_pos, lambda_pos, k_neg, lambda_neg

    @classmethod
    def from_section(cls, g) -> "GrpoSpec":
        """From the config's `grpo` section (`jaxlora.config.grpo.GrpoSection`)."""
        same = {f.name: getattr(g, f.name) for f in dataclasses.fields(cls) if f.name != "vespo"}
        return cls(**same, vespo=(g.vespo_k_pos, g.vespo_lambda_pos, g.vespo_k_neg, g.vespo_lambda_neg))

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_old(self) -> bool:
        """Whether the batch carries the sampler's log-probs (else the current ones, detached, as TRL)."""
        return self.num_iterations > 1

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return BATCH_KEYS + ("old_logps",) * self.needs_old + ("ref_logps",) * (self.beta != 0)

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = ("kl",) * (self.beta != 0) + ("entropy",) + ("policy_loss",) * (self.entropy_coef != 0)
        if self.loss_type in CLIPPED:
            return names + CLIP_METRICS
        return names + OTHER_METRICS.get(self.loss_type, ())


def grpo_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, loss_mask=None) -> dict:
    """The `Grpo` batch arrays (numpy) from TRL's layout: prompts left-padded [B, P], completions
    right-padded [B, C], their 0/1 masks; `loss_mask` [B, C] (default `completion_mask`) is what counts
    in the loss (zeros for truncated completions with mask_truncated_completions)."""
    ids = np.concatenate([prompt_ids, completion_ids], axis=1).astype(np.int32)
    seg = np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    mask = completion_mask if loss_mask is None else loss_mask
    return {
        "input_ids": ids,
        "positions": positions,
        "segment_ids": seg,
        "completion_mask": np.asarray(mask, np.float32),
    }


def token_logps(params, cfg, hidden: jax.Array, targets: jax.Array, temperature: float, chunk: int,
                entropy_grad: bool = False):  # fmt: skip
    """(log-probs [N], entropies [N]) of `targets` [N] under the temperature-scaled logits of hidden
    [N, D], `chunk` positions' [chunk, V] logits at a time (recomputed in the backward pass). The
    entropies carry a gradient only with `entropy_grad` (the entropy bonus)."""
    n, d = hidden.shape
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t = jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk)
    w = lm_head_kernel(params, cfg)  # [D, V]
    dt = jnp.dtype(cfg.runtime.compute_dtype)

    @jax.checkpoint
    def one(hc, tc):  # [K, D], [K] -> [K], [K]
        logits = jnp.einsum("kd,dv->kv", hc.astype(dt), w, preferred_element_type=jnp.float32)
        logits = cap_logits(logits, cfg) / temperature  # [K, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        entropy = lse - jnp.sum(jnp.exp(logits - lse[:, None]) * logits, axis=-1)
        return picked - lse, entropy if entropy_grad else jax.lax.stop_gradient(entropy)

    logp, ent = jax.lax.map(lambda xs: one(*xs), (h, t))
    return logp.reshape(-1)[:n], ent.reshape(-1)[:n]


def completion_logps(
    lora, base, batch: dict, lora_scale, spec: StepSpec, temperature: float, rng=None, train: bool = False,
    entropy_grad: bool = False,
):  # fmt: skip
    """(log-probs [B, C], entropies [B, C], MoE aux loss) of each completion token of `batch` (the
    layout above), from the decoder with `lora` (None: the adapter off, the reference), the logits divided
    by `temperature`. `train` applies LoRA dropout with `rng` and computes the MoE aux loss;
    `entropy_grad` gives the entropies a gradient."""
    ids = batch["input_ids"]
    b, t = ids.shape
    c = batch["completion_mask"].shape[-1]
    params, lo = with_embeddings(base, lora)
    aux_on = train and spec.aux_loss_coef > 0 and spec.model.num_experts > 0
    out = forward(
        params, spec.model, ids, batch["positions"], batch["segment_ids"], lora=lo, lora_scale=lora_scale,
        lora_dropout=spec.lora_dropout if train else 0.0,
        dropout_rng=rng if train and spec.lora_dropout > 0 else None, return_hidden=True,
        return_aux_loss=aux_on,
    )  # fmt: skip
    hidden, aux = out if aux_on else (out, jnp.float32(0))
    h = hidden[:, t - c - 1 : t - 1]  # [B, C, D]: the positions that predict the completion tokens
    logp, ent = token_logps(params, spec.model, h.reshape(b * c, -1), ids[:, t - c :].reshape(-1),
                            temperature, spec.loss_chunk, entropy_grad)  # fmt: skip
    return logp.reshape(b, c), ent.reshape(b, c), aux


def _gamma_weights(g: GrpoSpec, adv, log_ratio, mask):
    """VESPO's per-completion weight phi(w) [B, 1] of the sequence ratio w (TRL's `get_gamma_weights`)."""
    k_pos, lam_pos, k_neg, lam_neg = g.vespo
    low = math.log(1e-8)
    seq = jnp.sum(jnp.clip(log_ratio, -20.0, 20.0) * mask, axis=-1, keepdims=True)
    log_w = jnp.clip(seq, low, 20.0)
    nonneg = adv >= 0
    k, lam = jnp.where(nonneg, k_pos, k_neg), jnp.maximum(jnp.where(nonneg, lam_pos, lam_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def _surrogate(g: GrpoSpec, coef_1, adv, logps, log_ratio, mask):
    """(per-token policy loss, coef_1 as the clip metrics read it, extra metric values)."""
    lt = g.loss_type
    if lt == "cispo":
        capped = jax.lax.stop_gradient(jnp.minimum(coef_1, g.eps_high))
        return -capped * adv * logps, coef_1, {"cispo_clip_ratio": (coef_1 > g.eps_high) & (adv > 0)}
    if lt in CLIPPED:
        coef_2 = jnp.clip(coef_1, 1 - g.epsilon, 1 + g.eps_high)
        if g.delta is not None:
            coef_1 = jnp.minimum(coef_1, g.delta)
        low = (coef_1 < 1 - g.epsilon) & (adv < 0)
        high = (coef_1 > 1 + g.eps_high) & (adv > 0)
        clips = dict(zip(CLIP_METRICS, (low, high, low | high), strict=True))
        return -jnp.minimum(coef_1 * adv, coef_2 * adv), coef_1, clips
    if lt == "sapo":
        temp = jnp.where(adv > 0, g.sapo_temperature_pos, g.sapo_temperature_neg)
        return -jax.nn.sigmoid(temp * (coef_1 - 1)) * 4 / temp * adv, coef_1, {}
    if lt == "vespo":
        phi = _gamma_weights(g, adv, log_ratio, mask)
        return -phi * adv * logps, coef_1, {"vespo/phi_seq_mean": phi}
    raise ValueError(f"unknown loss_type {lt!r}")


def policy_terms(g: GrpoSpec, logps, old, ref, adv, mask, keep=None) -> tuple[jax.Array, dict]:
    """(per-token loss [B, C] or [B, 1], metric values {name: [B, C] or [B, 1]}) from the current
    log-probs [B, C], the sampler's `old` [B, C], the reference's `ref` [B, C] (beta > 0), advantages [B],
    the loss mask [B, C] and `keep` [B, C] (the high-entropy tokens; None = all), as TRL's `_compute_loss`."""
    adv = adv[:, None]
    log_ratio = logps - old
    if g.importance_sampling_level == "sequence":
        liw = jnp.sum(log_ratio * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        liw = liw[:, None]  # [B, 1]
    else:
        liw = log_ratio
    coef_1 = jnp.exp(liw)
    metrics = {}
    if g.beta != 0:
        kl = jnp.exp(ref - logps) - (ref - logps) - 1
        kl = kl * coef_1 if g.use_bias_correction_kl else kl
        metrics["kl"] = kl
    loss, coef_1, extra = _surrogate(g, coef_1, adv, logps, log_ratio, mask)
    metrics.update(extra)
    if g.off_policy_mask_threshold is not None:  # DeepSeek-V3.2's off-policy sequence mask
        drift = jnp.nan_to_num(old - jax.lax.stop_gradient(logps), nan=0.0)
        seq = jnp.sum(drift * mask, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1.0)
        loss = loss * ((adv >= 0) | (seq <= g.off_policy_mask_threshold)).astype(mask.dtype)
    if keep is not None:
        loss = loss * keep.astype(mask.dtype)
    if g.beta != 0:
        loss = loss + g.beta * metrics["kl"]
    return loss, metrics


def _reduce(g: GrpoSpec, loss, mask, totals) -> jax.Array:
    """One micro-batch's share of the batch loss (`loss_type`'s normalisation, see the module doc)."""
    masked = loss * mask  # [B, C]
    rows, tokens = totals["rows"], jnp.maximum(totals["tokens"], 1.0)
    if g.loss_type in ("grpo", "sapo"):
        return jnp.sum(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)) / rows
    if g.loss_type == "bnpo":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0) / totals["micro_batches"]
    if g.loss_type == "dr_grpo":
        return jnp.sum(masked) / (rows * g.max_completion_length)
    if g.loss_type == "luspo":
        return jnp.sum(masked) / rows
    return jnp.sum(masked) / tokens  # dapo, cispo, vespo


def high_entropy_mask(entropy, mask, quantile: float) -> jax.Array:
    """[B, C] bool: the loss tokens (`mask` [B, C] > 0) whose entropy [B, C] is >= the (1 - quantile)
    quantile of the loss tokens' entropies (linear interpolation; none without loss tokens), TRL's
    `get_high_entropy_mask`."""
    entropy = jax.lax.stop_gradient(entropy).astype(jnp.float32)
    on = mask > 0
    threshold = jnp.nanquantile(jnp.where(on, entropy, jnp.nan), 1.0 - quantile)
    return on & (entropy >= threshold)


def batch_loss(g: GrpoSpec, logps, entropy, mb: dict, totals: dict) -> tuple[jax.Array, dict]:
    """(this micro-batch's share of the loss, its metric sums) from the current log-probs and entropies
    [B, C] of its completions (`completion_logps`), its batch arrays and the batch's `totals`."""
    mask = mb["completion_mask"]
    old = mb["old_logps"] if g.needs_old else jax.lax.stop_gradient(logps)
    keep = high_entropy_mask(entropy, mask, g.top_entropy_quantile) if g.top_entropy_quantile < 1 else None
    loss, values = policy_terms(g, logps, old, mb.get("ref_logps"), mb["advantages"], mask, keep)
    value = _reduce(g, loss, mask, totals)
    sums = _metric_sums({**values, "entropy": entropy}, mask, totals)
    if g.entropy_coef != 0:  # TRL: a token mean over each micro-batch's kept tokens, not loss_type's
        sums["policy_loss"] = jax.lax.stop_gradient(value).astype(jnp.float32)
        kept = mask if keep is None else mask * keep
        mean = jnp.sum(entropy * kept) / jnp.maximum(jnp.sum(kept), 1.0)
        value = value - g.entropy_coef * mean / totals["micro_batches"]
    return value, sums


def _metric_sums(values: dict, mask, totals) -> dict:
    """Each metric's share of its batch mean: over the tokens, or over completions for [B, 1] values."""
    out = {}
    for name, x in values.items():
        x = jax.lax.stop_gradient(x).astype(jnp.float32)
        if x.shape[1] == 1:
            out[name] = jnp.sum(x) / totals["rows"]
        else:
            out[name] = jnp.sum(x * mask) / jnp.maximum(totals["tokens"], 1.0)
    return out


@dataclasses.dataclass(frozen=True)
class Grpo(Objective):
    """GRPO on [A, B, ...] micro-batches of completions (the layout above); `updates_per_batch` optimizer
    steps on each batch (`num_iterations`)."""

    spec: StepSpec
    grpo: GrpoSpec = GrpoSpec()

    @property
    def batch_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.grpo.batch_keys

    @property
    def sum_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.grpo.metric_names + ("aux_loss",) * self._aux

    @property
    def updates_per_batch(self) -> int:  # type: ignore[override]
        return self.grpo.num_iterations

    @property
    def _aux(self) -> bool:
        return self.spec.aux_loss_coef > 0 and self.spec.model.num_experts > 0

    def totals(self, batch: dict) -> dict:
        """Completions, loss tokens and micro-batches of the [A, B, ...] batch (summed over devices)."""
        mask = batch["completion_mask"]  # [A, B, C]
        return {
            "rows": jnp.float32(mask.shape[0] * mask.shape[1]),
            "tokens": jnp.sum(mask, dtype=jnp.float32),
            "micro_batches": jnp.float32(mask.shape[0]),
        }

    def _terms(self, lora, base, mb, lora_scale, rng, totals, train: bool):
        g = self.grpo
        logps, ent, aux = completion_logps(
            lora, base, mb, lora_scale, self.spec, g.temperature, rng, train, entropy_grad=g.entropy_coef != 0
        )
        value, sums = batch_loss(g, logps, ent, mb, totals)
        if self._aux and train:  # TRL: + coef * aux / gradient accumulation steps
            sums["aux_loss"] = jax.lax.stop_gradient(aux) / totals["micro_batches"]
            value = value + self.spec.aux_loss_coef * aux / totals["micro_batches"]
        return value, sums

    def loss(self, lora, base, mb, lora_scale, rng, totals, *extra):
        return self._terms(lora, base, mb, lora_scale, rng, totals, train=True)

    def finish(self, value, sums, totals):
        metrics = {"loss": value, "tokens": totals["tokens"], **sums}
        if self.grpo.entropy_coef != 0:  # TRL logs the (static) coefficient at each training step
            metrics["entropy_coef"] = jnp.float32(self.grpo.entropy_coef)
        return jnp.float32(1), metrics, (value,)

    def eval_sums(self, lora, base, batch, lora_scale, *extra):
        """{"loss", metrics..., "count": 1} for one [B, ...] batch of completions: the loop's mean over
        eval batches is TRL's mean of per-batch values."""
        totals = self.totals(jax.tree.map(lambda x: x[None], batch))
        value, sums = self._terms(lora, base, batch, lora_scale, None, totals, train=False)
        return {"loss": value, **sums, "count": jnp.float32(1)}
