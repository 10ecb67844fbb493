"""The one train step takes a new objective without a change: a GRPO-shaped one, written here in a few
lines, gets gradient accumulation, the optax update and the finite guard from `make_train_step`.

Its inputs are computed outside the gradient, as GRPO's are (sampled completions, their advantages and
the log-probs of the policy that sampled them), and it takes several optimizer steps on one batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.data import IGNORE
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models.decoder import forward
from jaxlora.train.objective import Objective, StepSpec
from jaxlora.train.step import make_train_step

T, B = 12, 4


@dataclasses.dataclass(frozen=True)
class ClippedPolicyGradient(Objective):
    """PPO/GRPO's clipped surrogate per completion token: -min(r A, clip(r, 1 +- eps) A), r = p / p_old."""

    spec: StepSpec
    eps: float = 0.2
    sum_names: tuple[str, ...] = ("clipped",)
    batch_keys: tuple[str, ...] = (
        "input_ids",
        "targets",
        "positions",
        "segment_ids",
        "advantages",
        "old_logps",
    )

    def totals(self, batch):
        return {"tokens": jnp.sum(batch["targets"] != IGNORE, dtype=jnp.float32)}

    def loss(self, lora, base, mb, lora_scale, rng, totals):
        logps = token_logps(lora, base, mb, lora_scale, self.spec)  # [B, T]
        mask, adv = mb["targets"] != IGNORE, mb["advantages"][:, None]  # [B, T], [B, 1]
        ratio = jnp.exp(logps - mb["old_logps"])
        surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - self.eps, 1 + self.eps) * adv)
        clipped = jnp.sum(mask & (jnp.abs(ratio - 1) > self.eps), dtype=jnp.float32)
        return -jnp.sum(jnp.where(mask, surrogate, 0.0)) / totals["tokens"], {"clipped": clipped}

    def finish(self, value, sums, totals):
        metrics = {
            "loss": value,
            "tokens": totals["tokens"],
            "clip_ratio": sums["clipped"] / totals["tokens"],
        }
        return jnp.float32(1), metrics, (value,)


def token_logps(lora, base, mb, lora_scale, spec):
    logits = forward(
        base,
        spec.model,
        mb["input_ids"],
        mb["positions"],
        mb["segment_ids"],
        lora=lora,
        lora_scale=lora_scale,
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.where(mb["targets"] == IGNORE, 0, mb["targets"])
    return jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]


def rollouts(vocab: int, lora, base, scale, spec) -> dict:
    """[B, T] completions with their advantages and old log-probs, computed outside the gradient."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(B, T + 1)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[:, : T // 2] = IGNORE  # the prompt: no loss
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(targets),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
    }
    rewards = jnp.asarray(rng.normal(size=B), jnp.float32)
    batch["advantages"] = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # the group's baseline
    batch["old_logps"] = jax.jit(token_logps, static_argnums=4)(lora, base, batch, scale, spec)
    return batch


def test_grpo_shaped_objective_runs_on_the_one_step(base):
    _, model = base("llama")
    spec = StepSpec(model.config)
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lora = init_lora(model.config, lc, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # B != 0: the policy differs from the base
    scale = jnp.asarray(lora_scale(model.config, lc))
    batch = rollouts(model.config.vocab_size, lora, model.params, scale, spec)
    objective = ClippedPolicyGradient(spec)
    opt = optax.adamw(3e-2)
    step = jax.jit(make_train_step(objective, opt))
    rng = jax.random.key(1)

    # accumulation equals one large batch: [1, 4, T] and [2, 2, T] give the same gradient (plain SGD)
    one = jax.tree.map(lambda x: x[None], batch)
    two = jax.tree.map(lambda x: x.reshape(2, B // 2, *x.shape[1:]), batch)
    sgd = optax.sgd(1.0)
    plain = jax.jit(make_train_step(objective, sgd))
    adapter = Adapter.split(lora)
    (l1, _, m1), (l2, _, m2) = (
        plain(adapter, sgd.init(lora), model.params, b, rng, scale) for b in (one, two)
    )
    assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-6 and float(m1["clip_ratio"]) == 0.0
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    d1, d2 = flat(l1.tree()) - flat(lora), flat(l2.tree()) - flat(lora)
    # float32 sums in another order: entries that nearly cancel are compared against the largest one
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5 * np.abs(d1).max())
    # ratio 1 at the first step: the surrogate's value is -mean(A) over tokens; its gradient moves lora
    n = np.asarray(batch["targets"] != IGNORE)
    want = -float(np.sum(np.asarray(batch["advantages"])[:, None] * n) / n.sum())
    assert abs(float(m1["loss"]) - want) < 1e-5 and float(m1["grad_norm"]) > 0

    # several optimizer steps on the one batch (GRPO's mu): the policy moves away from the sampler's, the
    # surrogate improves and, with a large step, ratios leave the trust region and get clipped
    state, losses, clips = (adapter, opt.init(lora)), [], []
    for _ in range(4):
        new_lora, new_opt, m = step(*state, model.params, one, rng, scale)
        state = (new_lora, new_opt)
        losses.append(float(m["loss"]))
        clips.append(float(m["clip_ratio"]))
        assert not bool(m["nonfinite"])
    assert losses[-1] < losses[0], losses
    assert max(clips) > 0, clips
