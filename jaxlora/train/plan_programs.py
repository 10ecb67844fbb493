"""The programs `jaxlora plan` compiles from abstract arrays (`jaxlora.train.memory_plan`): the run's train
step, its batch given as shapes, and GRPO's rollout (the prefill and the whole decode loop over its KV
cache), and XLA's bytes per device of each.

Batch shapes (A accumulation steps, B rows per micro-batch; under pmap a leading [devices] axis and B split
over it):

    sft, dpo, orpo   every key [A, B, T] int32, T = data.seq_len
    grpo             input_ids, positions, segment_ids [A, B, P + C] int32 (the prompt left-padded to
                     P = grpo.max_prompt_length, else data.seq_len; C = grpo.max_completion_length),
                     completion_mask, old_logps, ref_logps [A, B, C] float32, advantages [A, B] float32

GRPO runs its two programs one after the other, so its peak is the larger of the step's and the rollout's
(plus the optimizer state, which the rollout does not take but which stays on the device meanwhile).
"""

import jax
import numpy as np

from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models.rollout import rollout
from jaxlora.parallel import Plan
from jaxlora.train.registry import objective_for
from jaxlora.train.step import make_train_step

__all__ = ["abstract_batch", "compile_rollout", "compile_step", "grpo_lengths", "run_seq_len", "step_memory"]

FLOAT_KEYS = {"completion_mask": 1, "old_logps": 1, "ref_logps": 1, "advantages": 0}  # key -> trailing dims


def grpo_lengths(cfg: Config) -> tuple[int, int]:
    """(P, C): the prompt length a GRPO plan pads to (grpo.max_prompt_length, else data.seq_len) and the
    completion length (grpo.max_completion_length)."""
    g = cfg.grpo
    return g.max_prompt_length or cfg.data.seq_len, g.max_completion_length


def run_seq_len(cfg: Config) -> int:
    """The length of the train step's token rows: data.seq_len, or GRPO's P + C."""
    return sum(grpo_lengths(cfg)) if cfg.train.objective == "grpo" else cfg.data.seq_len


def abstract_batch(plan: Plan, keys, accum: int, batch: int, seq_len: int, completion: int = 0) -> dict:
    """The train step's batch argument as shapes (module doc), rows sharded as `Plan.put_batch` shards
    them (the same sharding lets a later call reuse the compilation). `completion`: GRPO's C."""
    out = {}
    for k in keys:
        trailing = (completion,) * FLOAT_KEYS[k] if k in FLOAT_KEYS else (seq_len,)
        dtype = np.float32 if k in FLOAT_KEYS else np.int32
        if plan.strategy == "pmap":
            n = jax.local_device_count()
            out[k] = jax.ShapeDtypeStruct((n, accum, batch // n, *trailing), dtype)
            continue
        shape = (accum, batch, *trailing)
        sharding = plan.sharding((None, "batch") + (None,) * len(trailing), shape)
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return out


def compile_step(cfg: Config, state, plan: Plan, seq_len: int):
    """The run's train step compiled for `plan` from `state`'s shapes (`memory_plan.State`) at `seq_len`
    (XLA's executable; the plan's shardings are the step's `in_shardings`)."""
    objective = objective_for(cfg, state.model)
    step = make_train_step(objective, state.optimizer, plan.collective)
    lora_s = plan.lora_shardings(state.adapter)
    opt_s = plan.like_shardings(state.opt_state, state.adapter.trainable, lora_s.trainable)
    extra_s = tuple(plan.lora_shardings(x) for x in state.extra)
    fn = plan.compile_train_step(step, lora_s, opt_s, plan.param_shardings(state.base), extra_s)
    if not hasattr(fn, "lower"):
        raise UserError("jaxlora plan cannot compile a multi-process pmap step; plan one process's mesh")
    t = cfg.train
    completion = grpo_lengths(cfg)[1] if t.objective == "grpo" else 0
    batch = abstract_batch(plan, objective.batch_keys, t.grad_accum_steps, t.batch_size, seq_len, completion)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    scale = jax.ShapeDtypeStruct((state.model.num_layers,), np.float32)
    return fn.lower(state.adapter, state.opt_state, state.base, batch, rng, scale, *state.extra).compile()


def _placed(tree, shardings):
    """`tree`'s shapes with `shardings` attached (None: as they are)."""
    if shardings is None:
        return tree
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_rollout(cfg: Config, state, plan: Plan):
    """GRPO's rollout as the run calls it each step (`jaxlora.train.grpo_feed`): the step's prompts
    [A * B / G, P] with the current adapter, G completions of C tokens each, compiled from shapes. No EOS
    is given, so the loop may run all C steps, as the longest rollout does."""
    g, t = cfg.grpo, cfg.train
    prompt_len, completion = grpo_lengths(cfg)
    prompts = t.batch_size * t.grad_accum_steps // g.num_generations
    model, lora = state.model, state.adapter.tree()
    sharded = plan.strategy == "mesh"
    base = _placed(state.base, plan.param_shardings(state.base) if sharded else None)
    lora = _placed(lora, plan.lora_shardings(lora) if sharded else None)

    def program(params, lora, scale, ids, mask, rng):
        params, lora = with_embeddings(params, lora)
        return rollout(
            params, model, lora, scale, ids, mask, rng, num_generations=g.num_generations,
            max_new_tokens=completion, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
            min_p=g.min_p, repetition_penalty=g.repetition_penalty,
        )  # fmt: skip

    ids = jax.ShapeDtypeStruct((prompts, prompt_len), np.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    scale = jax.ShapeDtypeStruct((model.num_layers,), np.float32)
    return jax.jit(program).lower(base, lora, scale, ids, ids, rng).compile()


def step_memory(compiled) -> dict:
    """Bytes per device of a compiled program (`memory_analysis`): arguments, outputs, aliased, temp (as
    `activations`) and `peak` = arguments + temp + outputs - aliased."""
    m = compiled.memory_analysis()
    args, out, alias, temp = (
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
    )
    return {"arguments": args, "outputs": out, "aliased": alias, "activations": temp,
            "peak": args + temp + out - alias}  # fmt: skip
