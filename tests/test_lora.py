"""[lora] targets as PEFT matches them, init, scaling, B = 0 is the base, merge/unmerge, only LoRA trains."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.errors import UserError
from jaxlora.lora import (
    LoraConfig,
    count_params,
    init_lora,
    layer_mask,
    lora_scale,
    merge,
    target_paths,
    unmerge,
)
from jaxlora.models import config_from_hf, forward, load_model
from jaxlora.models.targets import linear_dims
from jaxlora.quant import QuantizedTensor, dequantize, quantize
from tests.helpers.hf_tiny import FAMILIES, hf_config, make_hf_model

# Compiled, the adapter's program and the base's may differ in the last bits: XLA:CPU fuses RoPE's
# multiply-adds differently once the (zero) LoRA add sits in front of them (qwen2 r8_qv: 3.1e-6 on jax
# 0.12). That is code generation, not maths, and jaxlib 0.12 has no option to turn it off (0.10's
# `xla_cpu_use_fusion_emitters` is gone), so the bitwise check runs op by op (`jax.disable_jit`).
fwd = jax.jit(forward, static_argnums=1)


def tiny_cfg(family: str):
    return config_from_hf(hf_config(family).to_dict())


def qv(family: str) -> list[str]:
    return ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]


def configs(family: str) -> dict[str, LoraConfig]:
    """The two settings every family is checked with."""
    return {
        "r8_qv": LoraConfig(r=8, alpha=16, target_modules=qv(family)),
        "r16_rslora_all": LoraConfig(r=16, alpha=32, use_rslora=True, target_modules="all-linear"),
    }


def randomized(lora: dict, seed: int, std: float = 0.1) -> dict:
    """Non-zero random A and B (B is 0 after init), drawn on the host."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * std), lora)


_MODELS: dict = {}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    def get(family):
        if family not in _MODELS:
            folder = tmp_path_factory.mktemp(family)
            make_hf_model(family, folder)
            _MODELS[family] = load_model(folder)
        return _MODELS[family]

    return get


def token_ids(vocab: int, shape=(2, 10)) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(3, vocab, size=shape), jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Targets, config, init, scale


def test_target_modules_match_as_peft_does():
    llama, gpt2 = tiny_cfg("llama"), tiny_cfg("gpt2")
    t = lambda cfg, targets, **kw: target_paths(cfg, LoraConfig(target_modules=targets, **kw))  # noqa: E731
    assert t(llama, ["q_proj", "v_proj"]) == [("attn", "q_proj"), ("attn", "v_proj")]
    # suffix after a dot, as PEFT: "self_attn.o_proj" and "mlp.down_proj"; "proj" alone matches nothing
    assert t(llama, ["self_attn.o_proj", "mlp.down_proj"]) == [("attn", "o_proj"), ("mlp", "down_proj")]
    with pytest.raises(UserError):
        t(llama, ["proj"])
    # regex: full match against the full module name
    assert t(llama, r"model\.layers\.\d+\.mlp\.(gate|up)_proj") == [("mlp", "gate_proj"), ("mlp", "up_proj")]
    with pytest.raises(UserError):
        t(llama, "q_proj")  # a regex must match the whole name
    assert len(t(llama, "all-linear")) == 7
    assert t(gpt2, "all-linear") == [
        ("attn", "c_attn"),
        ("attn", "c_proj"),
        ("mlp", "c_fc"),
        ("mlp", "c_proj"),
    ]
    assert t(gpt2, ["c_proj"]) == [("attn", "c_proj"), ("mlp", "c_proj")]
    assert t(gpt2, ["attn.c_proj"]) == [("attn", "c_proj")]
    # a regex naming one layer adapts only that layer; so does a full module name
    cfg = LoraConfig(target_modules=r".*\.1\.self_attn\.[qv]_proj")
    assert layer_mask(llama, cfg).tolist() == [False, True]
    assert layer_mask(llama, LoraConfig(target_modules=["model.layers.0.self_attn.q_proj"])).tolist() == [
        True,
        False,
    ]
    assert layer_mask(llama, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])).tolist() == [
        False,
        True,
    ]


def test_bad_lora_config_one_line_each():
    cfg = tiny_cfg("llama")
    with pytest.raises(UserError) as err:
        target_paths(cfg, LoraConfig(target_modules=["query_key_value", "dense"]))
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg and "query_key_value" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg
    with pytest.raises(UserError) as err:
        target_paths(tiny_cfg("gpt2"), LoraConfig(target_modules=r"nothing\..*"))
    assert "c_attn, attn.c_proj, c_fc, mlp.c_proj" in str(err.value)

    for r in (0, -4):
        with pytest.raises(UserError, match="r must be"):
            LoraConfig(r=r)
        # r is checked once, where LoraConfig is built: a bad rank never reaches init_lora or lora_scale
        with pytest.raises(UserError, match="r must be"):
            init_lora(cfg, LoraConfig(r=r, alpha=16.0, target_modules=["q_proj"]), jax.random.key(0))
        with pytest.raises(UserError, match="r must be"):
            lora_scale(cfg, LoraConfig(r=r, alpha=16.0, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="outside the model's 2 layers"):
        lora_scale(cfg, LoraConfig(target_modules=["q_proj"], layers_to_transform=[2]))
    with pytest.raises(UserError, match="cannot be combined with a regex"):
        lora_scale(cfg, LoraConfig(target_modules=".*q_proj", layers_to_transform=[0]))
    with pytest.raises(UserError, match="different layers for different modules"):
        target_paths(cfg, LoraConfig(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"]))


def test_scale_is_alpha_over_r_or_sqrt_r_and_masked():
    cfg = tiny_cfg("llama")
    np.testing.assert_array_equal(lora_scale(cfg, LoraConfig(r=8, alpha=16)), [2.0, 2.0])
    s = lora_scale(cfg, LoraConfig(r=16, alpha=32, use_rslora=True, layers_to_transform=[1]))
    assert s.dtype == np.float32 and s.tolist() == [0.0, 8.0]  # 32 / sqrt(16)


def test_init_is_peft_default_or_gaussian():
    family = "llama"
    cfg = tiny_cfg(family)
    lora = init_lora(cfg, LoraConfig(r=8, target_modules="all-linear"), jax.random.key(0))
    assert count_params(lora) == sum(x.size for x in jax.tree.leaves(lora))
    for group, mods in lora.items():
        for name, ab in mods.items():
            a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
            fan_in = a.shape[1]
            assert a.dtype == b.dtype == np.float32
            assert a.shape[0] == b.shape[0] == cfg.num_layers and a.shape[2] == b.shape[1] == 8
            # Kaiming uniform with a = sqrt(5) on lora_A [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(fan_in)
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound, (group, name)
            assert abs(a.std() - bound / math.sqrt(3)) < 0.15 * bound
            assert not b.any()
    # A of q_proj does not depend on which other modules are targeted
    only_q = init_lora(cfg, LoraConfig(r=8, target_modules=qv(family)[:1]), jax.random.key(0))
    g = "attn"
    name = qv(family)[0]
    np.testing.assert_array_equal(only_q[g][name]["a"], lora[g][name]["a"])

    gauss = init_lora(cfg, LoraConfig(r=4, target_modules="all-linear", init="gaussian"), jax.random.key(1))
    a = np.concatenate([np.asarray(ab["a"]).ravel() for m in gauss.values() for ab in m.values()])
    assert abs(a.std() - 1 / 4) < 0.02 and abs(a.mean()) < 0.02


def test_lora_params_float32_on_bfloat16_base(family_model):
    m = family_model("llama")
    cfg = m.config.with_runtime(compute_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m.params)
    lc = LoraConfig(r=8, alpha=16, target_modules="all-linear")
    lora = init_lora(cfg, lc, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
    ids = token_ids(cfg.vocab_size)
    base = fwd(params, cfg, ids)
    same = fwd(params, cfg, ids, lora=lora, lora_scale=lora_scale(cfg, lc))
    # B = 0 on a bfloat16 base: equal up to bfloat16 rounding only, because XLA keeps excess precision
    # across the base matmul when no LoRA follows it (bitwise with --xla_allow_excess_precision=false).
    d = np.abs(np.asarray(base) - np.asarray(same)).max()
    print(f"bfloat16 base, B = 0: max |adapter - base| logits {d:.2e}")
    assert d < 0.1
    moved = fwd(params, cfg, ids, lora=randomized(lora, 0), lora_scale=lora_scale(cfg, lc))
    assert np.isfinite(np.asarray(moved)).all() and not np.array_equal(np.asarray(moved), np.asarray(base))


# ----------------------------------------------------------------------------------------------------------
# B = 0 is the base; merge and unmerge


@pytest.mark.parametrize("family", FAMILIES)
def test_b_zero_is_base_bitwise_and_merge_round_trip(family, family_model):
    m = family_model(family)
    cfg, params = m.config, m.params
    ids = token_ids(cfg.vocab_size)
    base_logits = np.asarray(fwd(params, cfg, ids))
    with jax.disable_jit():  # op by op: XLA fuses the two programs differently (last-bit differences)
        eager_base = np.asarray(forward(params, cfg, ids))
    for tag, lc in configs(family).items():
        lora = init_lora(cfg, lc, jax.random.key(3))
        scale = jnp.asarray(lora_scale(cfg, lc))
        with jax.disable_jit():
            zero_b = np.asarray(forward(params, cfg, ids, lora=lora, lora_scale=scale))
        assert np.array_equal(zero_b, eager_base), f"{family} {tag}: B = 0 differs from the base"

        lora = randomized(lora, 1)
        adapted = np.asarray(fwd(params, cfg, ids, lora=lora, lora_scale=scale))
        assert np.abs(adapted - base_logits).max() > 1e-2  # the adapter does something
        merged = merge(params, lora, scale)
        d_merge = np.abs(np.asarray(fwd(merged, cfg, ids)) - adapted).max()
        restored = unmerge(merged, lora, scale)
        d_unmerge = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True)
        )
        print(
            f"{family} {tag}: B = 0 bitwise equal to the base; |merged - adapter| logits {d_merge:.2e}, "
            f"|unmerge(merge(W)) - W| {d_unmerge:.2e}"
        )
        assert d_merge < 1e-4 and d_unmerge < 1e-5
        # a new tree; the base is untouched and untargeted leaves are shared
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        assert merged["embed"]["embedding"] is params["embed"]["embedding"]
        g, name = target_paths(cfg, lc)[0]
        assert merged["layers"][g][name]["kernel"] is not params["layers"][g][name]["kernel"]
        assert np.array_equal(np.asarray(fwd(params, cfg, ids)), base_logits)


def test_merge_into_quantized_base_uses_dequantized_weights(family_model):
    m = family_model("llama")
    cfg = m.config
    qparams = dict(m.params, layers=dict(m.params["layers"]))
    for group in ("attn", "mlp"):
        qparams["layers"][group] = {
            name: dict(sub, kernel=quantize(np.asarray(sub["kernel"]), "int8")) if "kernel" in sub else sub
            for name, sub in m.params["layers"][group].items()
        }
    lc = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "down_proj"])
    lora = randomized(init_lora(cfg, lc, jax.random.key(0)), 2)
    scale = lora_scale(cfg, lc)
    merged = merge(qparams, lora, scale)
    q = qparams["layers"]["attn"]["q_proj"]["kernel"]
    k = merged["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, QuantizedTensor) and not isinstance(k, QuantizedTensor) and k.dtype == jnp.float32
    want = dequantize(q, jnp.float32) + scale[:, None, None] * jnp.einsum(
        "lir,lro->lio", lora["attn"]["q_proj"]["a"], lora["attn"]["q_proj"]["b"]
    )
    np.testing.assert_allclose(np.asarray(k), np.asarray(want), atol=1e-6)
    assert isinstance(merged["layers"]["attn"]["k_proj"]["kernel"], QuantizedTensor)  # untargeted: kept
    ids = token_ids(cfg.vocab_size)
    adapted = np.asarray(fwd(qparams, cfg, ids, lora=lora, lora_scale=scale))
    d = np.abs(np.asarray(fwd(merged, cfg, ids)) - adapted).max()
    print(f"int8 base: |merged - adapter| logits {d:.2e}")
    assert d < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Only LoRA trains


def test_only_lora_trains(family_model):
    m = family_model("llama")
    cfg, base = m.config, m.params
    lc = LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.0)
    lora = init_lora(cfg, lc, jax.random.key(0))
    scale = jnp.asarray(lora_scale(cfg, lc))
    ids = token_ids(cfg.vocab_size, (2, 12))
    n_lora = count_params(lora)
    assert n_lora == cfg.num_layers * 4 * sum(i + o for i, o in linear_dims(cfg).values()) == 4096

    def loss_fn(lora, base, ids, scale):
        logits = forward(base, cfg, ids[:, :-1], lora=lora, lora_scale=scale)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    grad_fn = jax.grad(loss_fn)  # argnums=0: the LoRA tree only; the base is a plain argument
    opt = optax.adamw(1e-2, weight_decay=0.01)
    opt_state = opt.init(lora)
    float_leaves = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    n_state = sum(x.size for x in float_leaves)
    print(f"LoRA params {n_lora}, AdamW state {n_state} (+ step count), base {count_params(base)}")
    assert n_state == 2 * n_lora  # mu and nu, nothing for the base

    # The compiled gradient function returns the LoRA tree and nothing else.
    out_info = jax.jit(grad_fn).lower(lora, base, ids, scale).out_info
    assert jax.tree.structure(out_info) == jax.tree.structure(lora)
    assert [o.shape for o in jax.tree.leaves(out_info)] == [x.shape for x in jax.tree.leaves(lora)]
    jaxpr = jax.make_jaxpr(grad_fn)(lora, base, ids, scale)
    out_shapes = [tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars]
    assert out_shapes == [x.shape for x in jax.tree.leaves(lora)]
    assert not {x.shape for x in jax.tree.leaves(base)} & set(out_shapes)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(lora, opt_state, base, ids, scale):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, ids, scale)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    before = jax.tree.map(np.array, base)
    lora_before = jax.tree.map(np.array, lora)
    losses = []
    for _ in range(4):
        lora, opt_state, loss = step(lora, opt_state, base, ids, scale)
        losses.append(float(loss))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before), strict=True):
        assert np.array_equal(np.asarray(a), b) and np.asarray(a).dtype == b.dtype
    changed = [
        not np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora_before), strict=True)
    ]
    assert all(changed)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses) - 1} AdamW steps on LoRA only")
    assert losses[-1] < losses[0]
