"""GRPO's data: each optimizer step's batch of completions, sampled, scored and turned into the `Grpo`
objective's arrays (`jaxlora.train.grpo`) before the step, as TRL's `_generate_and_score_completions`.

Per rollout (every `num_iterations` optimizer steps, which reuse its batch):

    prompts     P = batch_size x grad_accum_steps / num_generations rows of the `PromptLoader`
    rollout     G completions each (`jaxlora.models.rollout`), the key from the run's key and the rollout's
                index, so a resumed run samples what an uninterrupted one does
    rewards     `score` of the decoded completions with the rows' other columns (`RewardError`: the loader
                is moved back, and the loop saves a checkpoint before the run stops)
    advantages  group-relative (`jaxlora.train.advantages`)
    batch       `grpo_batch`, plus old_logps (num_iterations > 1) and ref_logps (beta > 0)

A checkpoint saved between the steps of one rollout carries its batch (`carry`, `attach`): a resumed run
goes on with the same answers, advantages, old log-probs and metrics as an uninterrupted one.

Shapes: B = P * G completions, Tp the longest prompt of the data, N = max_completion_length; the batch's
arrays are [A, batch_size, ...] split into `grad_accum_steps` micro-batches.
"""

import dataclasses
import sys

import jax
import numpy as np

from jaxlora.config import Config
from jaxlora.data.prompts import PromptLoader, Prompts, build_prompts
from jaxlora.errors import UserError
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.rollout import rollout
from jaxlora.train.advantages import advantages, completion_metrics, reward_metrics, truncated
from jaxlora.train.grpo import GrpoSpec, completion_logps, grpo_batch
from jaxlora.train.registry import objective_for
from jaxlora.train.rewards import load_rewards, score

__all__ = ["GrpoFeed", "build_grpo_data"]

ROLLOUT_SALT, EVAL_SALT = 0x726F, 0x6576  # folded into the run's key: rollouts apart from dropout, evals


def prompts_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum_steps // cfg.grpo.num_generations


@dataclasses.dataclass
class GrpoFeed:
    """Builds each step's micro-batches from rollouts of the current adapter (`micro`) and evaluates the
    mean reward on the validation prompts (`evaluate`)."""

    cfg: Config
    tokenizer: object
    loader: PromptLoader
    train: Prompts
    val: Prompts | None
    prompt_len: int  # Tp: every prompt is left-padded to it (one compiled rollout)
    funcs: list = dataclasses.field(default_factory=list)
    _cached: tuple | None = None  # (rollout index, micro-batches, host metrics)
    _logps: object = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.eos_ids or (0,))[0])

    def _pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompts and their mask, [P, Tp] int32."""
        out = np.full((len(ids), self.prompt_len), self.pad_id, np.int32)
        mask = np.zeros_like(out)
        for i, row in enumerate(ids):
            out[i, self.prompt_len - len(row) :], mask[i, self.prompt_len - len(row) :] = row, 1
        return out, mask

    def _sample(self, steps, lora, prompts: Prompts, key) -> dict:
        """Completions of `prompts` (G each), decoded and scored: the host arrays of one rollout."""
        g = self.cfg.grpo
        ids, mask = self._pad(prompts.ids)
        params, lo = with_embeddings(steps.base.params, lora)
        out = rollout(
            params, steps.base.config, lo, steps.scale, ids, mask, key,
            num_generations=g.num_generations, max_new_tokens=g.max_completion_length,
            temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
            repetition_penalty=g.repetition_penalty, eos_ids=self.eos_ids, pad_id=self.pad_id,
        )  # fmt: skip
        comp, cmask, lengths = jax.device_get((out.completions, out.mask, out.lengths))
        n = g.num_generations
        comp_ids = [[int(t) for t in row[:length]] for row, length in zip(comp, lengths, strict=True)]
        texts = self.tokenizer.batch_decode(comp_ids, skip_special_tokens=True)
        rep = [p for p in prompts.prompts for _ in range(n)]
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(rep, texts, strict=True)]  # fmt: skip
        columns = {k: [v for v in vs for _ in range(n)] for k, vs in prompts.columns.items()}
        rows = [r for r in prompts.rows for _ in range(n)]
        per_func = score(self.funcs, rep, completions, comp_ids, columns, rows)
        return {
            "prompt_ids": np.repeat(ids, n, 0), "prompt_mask": np.repeat(mask, n, 0), "completions": comp,
            "completion_mask": cmask, "lengths": lengths, "comp_ids": comp_ids, "texts": texts,
            "prompts": rep, "per_func": per_func,
        }  # fmt: skip

    def micro(self, state, steps) -> tuple[list[dict], dict]:
        """The step's micro-batches ([batch_size, ...] arrays, the objective's keys) and its host metrics
        (TRL's names). Rollout k = step // num_iterations serves num_iterations steps."""
        k = state.step // self.cfg.grpo.num_iterations
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, *self._rollout(state, steps, k))
        return self._cached[1], self._cached[2]

    def carry(self, step: int) -> tuple[dict, dict] | None:
        """What a checkpoint at `step` holds besides the state when `step` falls inside a rollout's
        steps: its micro-batches stacked ([A, batch_size, ...] per key) and {rollout, metrics}; else None."""
        k = step // self.cfg.grpo.num_iterations
        if step % self.cfg.grpo.num_iterations == 0 or self._cached is None or self._cached[0] != k:
            return None
        micro, metrics = self._cached[1:]
        arrays = {key: np.stack([m[key] for m in micro]) for key in micro[0]}
        return arrays, {"rollout": k, "metrics": {name: float(v) for name, v in metrics.items()}}

    def attach(self, ckpt, step: int) -> None:
        """Save `carry` with each of `ckpt`'s steps; a run resumed at `step` inside a rollout's steps takes
        that rollout's batch back from its checkpoint (one saved without it, by an older version: a
        warning, and the run samples a fresh batch)."""
        ckpt.carry = self.carry
        if step % self.cfg.grpo.num_iterations == 0:
            return
        saved = ckpt.read_carry(step)
        if saved is None:
            print(
                f"warning: checkpoint step {step} holds no GRPO batch in progress (saved by an older "
                "version): sampling a fresh one, so the run will not match an uninterrupted one exactly",
                file=sys.stderr,
            )
            return
        arrays, info = saved
        micro = [
            {key: np.asarray(v[i]) for key, v in arrays.items()}
            for i in range(self.cfg.train.grad_accum_steps)
        ]
        self._cached = (int(info["rollout"]), micro, dict(info["metrics"]))

    def _rollout(self, state, steps, k: int) -> tuple[list[dict], dict]:
        g, t = self.cfg.grpo, self.cfg.train
        before = self.loader.state()
        prompts = self.train.select(next(self.loader))
        key = jax.random.fold_in(jax.random.fold_in(steps.key, ROLLOUT_SALT), k)
        lora = state.adapter.tree()
        try:
            s = self._sample(steps, lora, prompts, key)
        except UserError:  # a reward function failed: the checkpoint the loop saves redoes this batch
            self.loader.restore(before)
            raise
        names = [f.name for f in self.funcs]
        adv, zero_std = advantages(
            s["per_func"], g.reward_weights, g.num_generations, g.scale_rewards, g.multi_objective_aggregation
        )
        cut = truncated(s["comp_ids"], [*self.eos_ids, self.pad_id])
        metrics = reward_metrics(s["per_func"], names, g.reward_weights, zero_std)
        metrics.update(completion_metrics(s["lengths"], cut))
        loss_mask = s["completion_mask"] * ~cut[:, None] if g.mask_truncated_completions else None
        batch = grpo_batch(
            s["prompt_ids"], s["prompt_mask"], s["completions"], s["completion_mask"], loss_mask
        )
        batch["advantages"] = adv
        spec = GrpoSpec.from_section(g)
        if spec.needs_old:
            batch["old_logps"] = self._logps_of(steps, lora, batch)
        if spec.beta != 0:
            batch["ref_logps"] = self._logps_of(steps, None, batch)
        bs = t.batch_size
        micro = [{k_: v[i * bs : (i + 1) * bs] for k_, v in batch.items()} for i in range(t.grad_accum_steps)]
        return micro, metrics

    def _logps_of(self, steps, lora, batch: dict) -> np.ndarray:
        """[B, C] log-probs of the completions with `lora` (None: the adapter off), no dropout."""
        if self._logps is None:
            spec = objective_for(self.cfg, steps.base.config).spec
            temp = self.cfg.grpo.temperature
            self._logps = jax.jit(
                lambda lo, base, b, scale: completion_logps(lo, base, b, scale, spec, temp)[0]
            )
        return np.asarray(self._logps(lora, steps.base.params, batch, steps.scale), np.float32)

    def evaluate(self, state, steps) -> tuple[dict | None, list[dict]]:
        """(`eval/reward` and the reward metrics of sampled completions of the validation prompts, the
        first `train.eval_samples` of them as samples {prompt, completion, reward}); (None, []) without
        validation prompts. `train.eval_batches` bounds the number of rollouts."""
        if self.val is None:
            return None, []
        p = self.loader.per_step
        n = self.val.size if self.cfg.train.eval_batches is None else self.cfg.train.eval_batches * p
        index = np.arange(min(n, self.val.size))
        key = jax.random.fold_in(jax.random.fold_in(steps.key, EVAL_SALT), state.step)
        per_func, samples = [], []
        for b, start in enumerate(range(0, len(index), p)):
            chunk = index[start : start + p]
            part = np.resize(chunk, p)  # the last chunk filled up by repetition: one compiled rollout
            s = self._sample(steps, state.adapter.tree(), self.val.select(part), jax.random.fold_in(key, b))
            keep = len(chunk) * self.cfg.grpo.num_generations
            per_func.append(s["per_func"][:keep])
            rewards = np.nansum(s["per_func"][:keep], axis=1)
            for prompt, text, r in zip(s["prompts"][:keep], s["texts"][:keep], rewards, strict=True):
                if len(samples) < self.cfg.train.eval_samples:
                    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                    samples.append({"prompt": shown, "completion": text, "reward": float(r)})
        names = [f.name for f in self.funcs]
        metrics = reward_metrics(np.concatenate(per_func), names, self.cfg.grpo.reward_weights)
        return {f"eval/{k}": v for k, v in metrics.items()}, samples


def build_grpo_data(cfg: Config, tokenizer, index_count: tuple[int, int]):
    """(the prompt loader, validation prompts, the feed, the number of steps) of a GRPO run."""
    if index_count[1] > 1:
        raise UserError("train.objective grpo runs on one process for now; run it without multi-host")
    g = cfg.grpo
    funcs = load_rewards(g.reward_funcs)  # a missing file or function: one line before any step
    train, val = build_prompts(cfg.data, tokenizer, cfg.seed, g.max_prompt_length)
    loader = PromptLoader(train, prompts_per_step(cfg), shuffle=cfg.data.shuffle, seed=cfg.seed)
    prompt_len = max(train.max_length, val.max_length if val is not None else 0)
    feed = GrpoFeed(cfg, tokenizer, loader, train, val, prompt_len, funcs)
    t = cfg.train
    total = []
    if t.max_steps is not None:
        total.append(t.max_steps)
    if t.num_epochs is not None:
        total.append(max(1, int(np.ceil(t.num_epochs * loader.num_batches_per_epoch))) * g.num_iterations)
    return loader, val, feed, min(total)
