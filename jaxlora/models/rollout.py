"""The rollout engine for online RL (GRPO): G sampled completions per prompt in one compiled program.

`rollout` prefills each prompt once, repeats its keys and values for the G completions, then decodes
inside a `lax.while_loop`: one token per row per iteration, finished rows emitting `pad_id`, the loop
ending when every row has met an EOS token or `max_new_tokens` are out. Nothing runs in Python per
token, and a second call with the same shapes and settings reuses the compiled program. Prefilling
once beats prefilling the prompts repeated G times by the G - 1 prefills it skips (`benchmarks/rollout.py`
measures both, beside transformers' `generate`).

The pieces are generation's (`jaxlora.models.generate`: `init_cache`, `prefill`, `decode_step`,
`sample`), in the same order and with the same random stream: split the key, sample, then run the step.
With G = 1 a rollout draws the tokens `generate` draws from `jax.random.key(seed)`. On a CPU the decode
step runs the layers unrolled on per-layer copies of the weights and cache (`layered_decoder`: a scan
over the stacked weights would copy each layer's slice at every token), the same tokens about 1.3 times
faster, for one more copy of the layer weights while the rollout runs.

It is a pure function of arrays: the base may be quantized (int8/NF4 kernels are `QuantizedTensor`s),
`lora` is the adapter tree the decoder takes, and params, adapter and prompts may arrive sharded (the
shardings propagate under `jit`; nothing here places data on devices).

Shapes: P prompts, G generations each (rows B = P * G, prompt p's completions at rows p*G .. p*G+G-1, as
TRL groups them), Tp prompt length, N = max_new_tokens, V vocabulary.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.attention import KVCache
from jaxlora.models.config import DecoderConfig
from jaxlora.models.decoder import LayerInputs, block, embed, layer_stack, logits_from_hidden, norm
from jaxlora.models.gemma4_cache import own_rows, repeat_global, type_stacks
from jaxlora.models.gemma4_layers import inv_freqs, kind_config, layer_trees, per_layer_inputs
from jaxlora.models.gemma4_spec import kv_source, layer_type
from jaxlora.models.generate import decode_step, init_cache, prefill, remember, sample, seen_tokens
from jaxlora.models.hybrid_cache import layer_view, mixer_stacks, repeat_states
from jaxlora.models.hybrid_layers import layer_slices


class Rollout(NamedTuple):
    """What `rollout` returns. Rows B = P * G, prompt-major."""

    completions: jax.Array  # [B, N] int32: the sampled tokens, `pad_id` after a row's first EOS
    mask: jax.Array  # [B, N] int32: 1 up to and including the first EOS (or all N), else 0
    lengths: jax.Array  # [B] int32: completion length, the EOS counted
    truncated: jax.Array  # [B] bool: no EOS within N tokens


class _Loop(NamedTuple):
    """The decode loop's carry."""

    n: jax.Array  # int32 scalar: tokens written so far
    token: jax.Array  # [B] int32: the last sampled token, the next step's input
    done: jax.Array  # [B] bool: the row has sampled an EOS
    lengths: jax.Array  # [B] int32: tokens written in the row, its EOS included
    out: jax.Array  # [B, N] int32
    cache: KVCache | tuple  # [L, B, Tp + N, K, H], or `layered_decoder`'s per-layer cache
    position: jax.Array  # [B] int32: the position of `token`
    rng: jax.Array
    seen: jax.Array | None  # [B, V] bool: the row's prompt and sampled tokens (repetition penalty only)


def repeat_cache(cache: KVCache, g: int, extra: int) -> KVCache:
    """Each row of a [L, P, S, K, H] cache G times (rows p*G .. p*G+G-1) with `extra` empty slots after
    its S -> [L, P*G, S + extra, K, H]; positions and segment ids [P*G, S + extra], the index kept."""

    def grow(a, axis):  # repeat rows on `axis`, pad the slot axis after it with zeros (segment 0: empty)
        a = jnp.repeat(a, g, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis + 1] = (0, extra)
        return jnp.pad(a, pad)

    cache = repeat_global(cache, partial(grow, axis=1))  # Gemma 4's full layers' keys and values
    cache = cache._replace(
        k=grow(cache.k, 1),
        v=grow(cache.v, 1),
        positions=grow(cache.positions, 0),
        segment_ids=grow(cache.segment_ids, 0),
    )
    return repeat_states(cache, g)  # a hybrid model's DeltaNet states: rows repeated, no slots


# what a call compiles for: the model and every sampling setting
STATIC = (
    "cfg", "num_generations", "max_new_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "eos_ids", "pad_id", "split_layers",
)  # fmt: skip


@partial(jax.jit, static_argnames=STATIC)
def rollout(
    params,
    cfg: DecoderConfig,
    lora,
    lora_scale,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    split_layers: bool | None = None,
) -> Rollout:
    """Sample `num_generations` completions of up to `max_new_tokens` tokens for each prompt.

    prompt_ids, prompt_mask: [P, Tp] int32, left-padded (mask 1 on real tokens, at least one per row);
    rng: a JAX key; lora: the adapter tree or None, scaled by `lora_scale` (scalar or [L]).
    Sampling is `generate.sample`'s: the repetition penalty (1 = off) on the raw logits of the tokens in
    the row's prompt (mask 1: padding not counted) or sampled so far, then temperature (0 = greedy), top-k
    (0 = off), top-p (1 = off), min-p (None or 0 = off). With a penalty the loop carries a [B, V] bool.
    A row stops at its first token in `eos_ids` (kept, counted in its length); the loop stops when every
    row has stopped or N tokens are out. Returns a `Rollout` of [P*G, N] completions and mask, [P*G]
    lengths and truncated flags. Static: cfg and every keyword argument (a new value compiles anew).
    `split_layers` (None: on a CPU) decodes with `layered_step` instead of the scanned `decode_step`.
    """
    g, new = num_generations, max_new_tokens
    if g < 1 or new < 1:
        raise ValueError(f"num_generations and max_new_tokens must be >= 1, got {g} and {new}")
    logits, cache, position = prefill_groups(params, cfg, lora, lora_scale, prompt_ids, prompt_mask, g, new)
    seen = None
    if repetition_penalty != 1.0:  # static: the default loop carries nothing more
        seen = jnp.repeat(seen_tokens(prompt_ids, prompt_mask, logits.shape[-1]), g, axis=0)  # [B, V]

    def pick(logits, rng, seen):  # the next tokens [B] and the key left, as `generate` draws them
        rng, sub = jax.random.split(rng)
        return sample(logits, sub, temperature, top_k, top_p, min_p, repetition_penalty, seen), rng

    if split_layers is None:
        split_layers = jax.default_backend() == "cpu"
    if split_layers:  # each layer's weights and cache as arrays of their own (see `layered_step`)
        step, cache = layered_decoder(params, cfg, lora, lora_scale, cache)
    else:

        def step(token, cache, position):  # the logits [B, V] after `token` [B], the cache a slot further
            return decode_step(params, cfg, cache, token, position, lora, lora_scale)

    eos = jnp.asarray(eos_ids, jnp.int32)
    s = decode_loop(step, pick, logits, cache, position, rng, eos, new, pad_id, seen)
    mask = (jnp.arange(new)[None, :] < s.lengths[:, None]).astype(jnp.int32)  # [B, N]
    return Rollout(s.out, mask, s.lengths, ~s.done)


def prefill_groups(params, cfg, lora, lora_scale, prompt_ids, prompt_mask, g: int, new: int):
    """Prefill the P prompts [P, Tp] once and give each of its G rows a copy of the keys and values.

    Returns the last logits [P*G, V], the cache [L, P*G, Tp + new, K, H] at index Tp and the position [P*G]
    of the first new token. (Prefilling the prompts repeated G times costs G times the prefill.)
    """
    p, tp = prompt_ids.shape
    logits, cache = prefill(params, cfg, init_cache(cfg, p, tp), prompt_ids, prompt_mask, lora, lora_scale)
    position = jnp.repeat(prompt_mask.astype(jnp.int32).sum(axis=1), g)
    return jnp.repeat(logits, g, axis=0), repeat_cache(cache, g, new), position


def decode_loop(step, pick, logits, cache: KVCache, position, rng, eos, new: int, pad_id: int, seen=None):
    """Sample from `logits` [B, V], then `step` and sample again until every row has drawn a token of
    `eos` [E] or `new` tokens are out: one `lax.while_loop`. `pick(logits, rng, seen)` samples; `seen`
    [B, V] bool (or None) marks the tokens drawn. Returns the final `_Loop` carry (`out` [B, new])."""
    token, rng = pick(logits, rng, seen)
    done = jnp.isin(token, eos)  # E = 0: never
    out = jnp.full((token.shape[0], new), pad_id, jnp.int32).at[:, 0].set(token)
    first = (jnp.ones((), jnp.int32), token, done, jnp.ones_like(token), out, cache, position, rng)
    state = _Loop(*first, remember(seen, token))

    def more(s: _Loop):
        return (s.n < new) & ~jnp.all(s.done)

    def body(s: _Loop) -> _Loop:
        logits, cache = step(s.token, s.cache, s.position)
        token, rng = pick(logits, s.rng, s.seen)
        written = jnp.where(s.done, pad_id, token)  # [B]: finished rows emit padding
        out = jax.lax.dynamic_update_slice(s.out, written[:, None], (0, s.n))
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(token, eos)
        return _Loop(s.n + 1, token, done, lengths, out, cache, s.position + 1, rng, remember(s.seen, token))

    return jax.lax.while_loop(more, body, state)


def layered_decoder(params, cfg: DecoderConfig, lora, lora_scale, cache: KVCache):
    """`layered_step` on copies of each layer's weights, adapter and cache, made once before the loop.

    A decode step inside a loop that scans the stacked [L, ...] weights copies every layer's slice out
    of them at each token on a CPU (XLA fuses no dynamic slice into a CPU dot), and scanning the stacked
    cache copies it too: with its own arrays per layer, a step reads each weight once and writes one
    slot of the cache in place. The cost: one more copy of the layer weights while the rollout runs.
    Returns (step(token, cache, position) -> (logits [B, V], cache), the per-layer cache to start from).
    """
    take = lambda tree, i: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    n = cfg.num_layers
    if cfg.global_head_dim:  # Gemma 4: k/v stacked by layer type; a KV-shared layer's: None (its source's)
        weights, adapters = layer_trees(cfg, params["layers"]), layer_trees(cfg, lora)
        rows, stacks = own_rows(cfg), type_stacks(cache)
        kv = tuple(tuple(a[rows[i][1]] for a in stacks[rows[i][0]]) if i in rows else None for i in range(n))
    elif cfg.mixers:  # hybrid: mixer weights and states stacked by kind (a DeltaNet layer's: `DeltaNetState`)
        weights, adapters = layer_slices(params["layers"], cfg.mixers), layer_slices(lora, cfg.mixers)
        kv = tuple(next(iter(part.values())) for part in layer_slices(mixer_stacks(cache), cfg.mixers))
    else:
        weights = [take(params["layers"], i) for i in range(n)]
        adapters = [take(lora, i) for i in range(n)]
        kv = tuple((cache.k[i], cache.v[i]) for i in range(n))
    start = (kv, cache.positions, cache.segment_ids, cache.index)

    def step(token, state, position):
        return layered_step(params, cfg, weights, adapters, lora_scale, state, token, position)

    return step, start


def layered_step(params, cfg, weights, adapters, lora_scale, state, token, position):
    """`generate.decode_step` with the layers unrolled on per-layer weights, adapters and cache.

    weights, adapters: L trees of one layer's arrays (adapters may be None); state: (((k, v) [B, S, K, H]
    or a DeltaNet layer's `DeltaNetState`, None for a Gemma 4 KV-shared layer) per layer, cache positions
    and segment ids [B, S], index); token, position: [B] int32.
    Returns (the logits [B, V] after `token`, the state one slot further).
    """
    kv, positions, segments, index = state
    pos, seg = position[:, None], jnp.ones_like(token)[:, None]  # [B, 1]
    positions = jax.lax.dynamic_update_slice(positions, pos, (0, index))
    segments = jax.lax.dynamic_update_slice(segments, seg, (0, index))
    _, _, inv_freq, windows, scales, _, _ = layer_stack(params, cfg, pos, None, lora_scale, None, None)
    h = embed(params, cfg, token[:, None], pos).astype(cfg.runtime.compute_dtype)  # [B, 1, D]
    if cfg.global_head_dim:
        per = _gemma4_layers(params, cfg, token, h)
    else:
        per = [(cfg, jax.tree.map(lambda a, i=i: a[i], inv_freq), None, i) for i in range(cfg.num_layers)]
    new_kv = []
    for i, part in enumerate(kv):
        layer_cfg, inv_i, ple, src = per[i]
        shared = None if src == i else new_kv[src]  # a KV-shared layer: its source's updated (k, v)
        x = LayerInputs(
            pos, seg, inv_i, windows[i], scales[i], ple=ple, shared_kv=shared,
            cache=layer_view(part if shared is None else shared, positions, segments, index),
        )  # fmt: skip
        h, (layer_kv, _) = block(layer_cfg, weights[i], adapters[i], h, x)
        new_kv.append(layer_kv if shared is None else None)
    logits = logits_from_hidden(params, cfg, norm(params["final_norm"], h[:, -1], cfg))  # [B, V]
    return logits, (tuple(new_kv), positions, segments, index + 1)


def _gemma4_layers(params, cfg: DecoderConfig, token, h) -> list:
    """Gemma 4's layers for `layered_step`: per layer (its type's config, RoPE inverse frequencies, its
    per-layer input [B, 1, P] or None, the layer whose keys and values it attends with) for the new
    `token` [B] whose scaled embedding is h [B, 1, D]."""
    inv, source = inv_freqs(cfg), kv_source(cfg)
    ple = per_layer_inputs(params, cfg, token[:, None], h) if cfg.ple_dim else None  # [B, 1, L, P]
    out = []
    for i, kind in enumerate(cfg.mixers):
        t = layer_type(kind)
        out.append((kind_config(cfg, t), inv[t], None if ple is None else ple[:, :, i], source[i]))
    return out
