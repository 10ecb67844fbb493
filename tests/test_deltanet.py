"""Qwen3.5's Gated DeltaNet layer (`jaxlora.models.deltanet`) against transformers' own functions and module,
in float32 on CPU: the chunked rule and its gradients, the one-token step, the whole layer with padding and
packed rows, and step-by-step generation against the chunked forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from jaxlora.models.decoder import linear
from jaxlora.models.deltanet import (
    DeltaNetDims,
    DeltaNetState,
    chunk_gated_delta_rule,
    gated_deltanet,
    init_state,
    recurrent_step,
)

B, T, HK, HV, DK, DV, CHUNK = 2, 37, 2, 4, 8, 6, 16  # T is not a multiple of the chunk


@pytest.fixture(scope="module")
def rule_inputs():
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g (<= 0), beta [B, T, Hv], a state [B, Hv, Dk, Dv]: numpy."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    g = -np.logaddexp(0, f(B, T, HV)) * 0.5
    beta = 1 / (1 + np.exp(-f(B, T, HV)))
    return f(B, T, HK, DK), f(B, T, HK, DK), f(B, T, HV, DV), g, beta.astype(np.float32), f(B, HV, DK, DV)


def _torch(q, k, *rest, grad=False):
    """(the torch leaves, the rule's arguments): q and k repeated to the Hv value heads, as transformers
    5.17's layer does before the rule (5.25 repeats inside it); the layer test checks this on the module."""
    leaves = [torch.tensor(a, requires_grad=grad) for a in (q, k, *rest)]
    return leaves, [x.repeat_interleave(HV // HK, dim=2) for x in leaves[:2]] + leaves[2:]


def test_chunk_rule_forward_equals_transformers(rule_inputs):
    q, k, v, g, beta, s0 = rule_inputs
    want, want_state = hf.torch_chunk_gated_delta_rule(
        *_torch(q, k, v, g, beta)[1], initial_state=torch.tensor(s0), output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    rule = jax.jit(
        chunk_gated_delta_rule, static_argnums=5, static_argnames=("use_qk_l2norm", "remat_chunks")
    )
    out, state = rule(q, k, v, g, beta, CHUNK, s0, use_qk_l2norm=True)
    assert out.shape == (B, T, HV, DV) and state.shape == (B, HV, DK, DV)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(state, want_state.numpy(), atol=1e-5)
    # without the l2 norm and the initial state, with one chunk longer than T, chunks batched (no remat)
    want, want_state = hf.torch_chunk_gated_delta_rule(*_torch(q, k, v, g, beta)[1], output_final_state=True)
    out, state = rule(q, k, v, g, beta, 64, remat_chunks=False)  # outputs up to ~30: relative 1e-5 too
    np.testing.assert_allclose(out, want.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state, want_state.numpy(), atol=1e-5, rtol=1e-5)


def test_chunk_rule_gradients_equal_torch_autograd(rule_inputs):
    q, k, v, g, beta, _ = rule_inputs
    rng = np.random.default_rng(1)
    d_out, d_state = rng.standard_normal((B, T, HV, DV)), rng.standard_normal((B, HV, DK, DV))
    d_out, d_state = d_out.astype(np.float32), d_state.astype(np.float32)
    leaves, args = _torch(q, k, v, g, beta, grad=True)
    out, state = hf.torch_chunk_gated_delta_rule(
        *args, chunk_size=CHUNK, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    ((out * torch.tensor(d_out)).sum() + (state * torch.tensor(d_state)).sum()).backward()

    for remat in (True, False):  # per-chunk remat (the default), and the within-chunk work batched

        def loss(*args, remat=remat):
            out, state = chunk_gated_delta_rule(*args, CHUNK, use_qk_l2norm=True, remat_chunks=remat)
            return jnp.sum(out * d_out) + jnp.sum(state * d_state)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
        for name, got, want in zip("q k v g beta".split(), grads, leaves, strict=True):
            np.testing.assert_allclose(got, want.grad.numpy(), atol=1e-4, err_msg=f"{name}, remat {remat}")


def test_recurrent_step_equals_transformers_recurrent_rule(rule_inputs):
    q, k, v, g, beta, s0 = rule_inputs
    want, want_state = hf.torch_recurrent_gated_delta_rule(
        *_torch(q, k, v, g, beta)[1], initial_state=torch.tensor(s0), output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip

    def step(state, xs):
        out, state = recurrent_step(*xs, state, use_qk_l2norm=True)
        return state, out

    state, out = jax.lax.scan(step, s0, [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta)])
    np.testing.assert_allclose(jnp.moveaxis(out, 0, 1), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(state, want_state.numpy(), atol=1e-5)


def test_chunk_rule_memory_is_linear_in_t():
    """No [T, T] array: the compiled forward + backward's temp bytes grow x4 from T = 1024 to 4096 (a [T, T]
    score matrix would make them grow x16; at T = 4096 it alone is 64 MiB, against ~5 MiB here)."""

    def temp_bytes(t):
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, t, 1, 8)] * 3 + [(1, t, 1)] * 2]
        loss = lambda *a: jnp.sum(chunk_gated_delta_rule(*a, 32)[0])  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large < 5 * small and large < 4096 * 4096 * 4 // 8, (small, large)


# --- the whole layer ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer():
    """(transformers' Qwen3_5GatedDeltaNet with random weights, its dims, the weights as jaxlora's dict, the
    jitted layer)."""
    config = Qwen3_5TextConfig(
        hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"], linear_num_key_heads=HK,
        linear_num_value_heads=HV, linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=4,
    )  # fmt: skip
    torch.manual_seed(0)
    module = hf.Qwen3_5GatedDeltaNet(config, 0).eval()
    with torch.no_grad():
        module.dt_bias.normal_()
        module.norm.weight.uniform_(0.5, 1.5)  # the plain weight: an offset would show
    p = _to_jaxlora({n: t.detach().numpy() for n, t in module.named_parameters()})
    dims = DeltaNetDims.from_hf(config.to_dict(), chunk=8)
    run = jax.jit(gated_deltanet, static_argnums=2)
    return module, dims, p, run


def _to_jaxlora(w: dict) -> dict:
    """transformers' Qwen3_5GatedDeltaNet tensors (or their gradients) by name -> jaxlora's layer dict."""
    names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
    p = {n: {"kernel": w[f"{n}.weight"].T} for n in names} | {
        "conv1d": {"kernel": w["conv1d.weight"][:, 0].T}
    }
    return jax.tree.map(
        jnp.asarray, p | {"A_log": w["A_log"], "dt_bias": w["dt_bias"], "norm": {"scale": w["norm.weight"]}}
    )


def _hidden(b, t, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, 32)).astype(np.float32)


def test_layer_equals_transformers_with_padding(layer):
    module, dims, p, run = layer
    x = _hidden(3, 29)
    mask = np.ones((3, 29), np.int32)
    mask[1, :7] = 0  # left padding
    mask[2, -5:] = 0  # right padding
    with torch.no_grad():
        want = module(torch.tensor(x)).numpy()
        want_masked = module(torch.tensor(x), attention_mask=torch.tensor(mask)).numpy()
    out, _ = run(p, x, dims, segment_ids=mask)
    np.testing.assert_allclose(out, want_masked, atol=1e-5)

    # unmasked, and every projection through decoder.linear with a zero-B adapter (the LoRA hook): the same
    def proj(name, inp):
        lora = {"a": jnp.ones((inp.shape[-1], 2)), "b": jnp.zeros((2, p[name]["kernel"].shape[-1]))}
        return linear(p[name], inp, jnp.float32, lora, jnp.float32(2.0))

    out, _ = jax.jit(gated_deltanet, static_argnums=(2, 3))(p, x, dims, proj)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_packed_row_equals_its_segments_run_alone(layer):
    """A packed row (3 segments and padding) against the module run on each segment alone: the outputs, and
    the gradients (torch autograd, summed over the segments) for the input and every weight."""
    module, dims, p, _ = layer
    lengths = (11, 13, 7)  # segments 1, 2, 3, then 3 padding positions; a chunk is 8
    x = _hidden(1, sum(lengths) + 3, seed=1)
    cotangent = _hidden(1, sum(lengths) + 3, seed=3)
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3)])[None]

    def loss(p, x):
        out, _ = gated_deltanet(p, x, dims, segment_ids=jnp.asarray(segment_ids, jnp.int32))
        return jnp.sum(out * cotangent), out

    (_, out), (dp, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
    module.zero_grad()
    start = 0
    for n in lengths:
        xs = torch.tensor(x[:, start : start + n], requires_grad=True)
        want = module(xs)
        (want * torch.tensor(cotangent[:, start : start + n])).sum().backward()
        np.testing.assert_allclose(out[:, start : start + n], want.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(dx[:, start : start + n], xs.grad.numpy(), atol=1e-5)
        start += n
    np.testing.assert_allclose(out[:, start:], 0.0)
    np.testing.assert_allclose(dx[:, start:], 0.0)
    want_dp = _to_jaxlora({n: t.grad.numpy() for n, t in module.named_parameters()})
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: np.testing.assert_allclose(
            got, want, atol=1e-4, err_msg=jax.tree_util.keystr(path)
        ),
        dp,
        want_dp,
    )


def test_step_by_step_generation_equals_chunked_forward(layer):
    """Prefill 9 tokens, continue with 3 at once, then one token at a time through the conv and recurrent
    states: the outputs and the final states equal one chunked forward over all the tokens."""
    _, dims, p, run = layer
    x = _hidden(2, 21, seed=2)
    want, want_state = run(p, x, dims)
    outs = []
    out, state = run(p, x[:, :9], dims, state=init_state(dims, 2))
    outs.append(out)
    out, state = run(p, x[:, 9:12], dims, state=state)
    outs.append(out)
    for t in range(12, 21):
        out, state = run(p, x[:, t : t + 1], dims, state=state)
        outs.append(out)
    assert isinstance(state, DeltaNetState) and state.conv.shape == (2, 3, dims.conv_dim)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-5)
    np.testing.assert_allclose(state.recurrent, want_state.recurrent, atol=1e-5)
    np.testing.assert_allclose(state.conv, _conv_inputs(p, x)[:, -3:], atol=1e-6)
    np.testing.assert_allclose(want_state.conv, state.conv, atol=1e-6)


def _conv_inputs(p, x):
    """The conv's inputs, in_proj_qkv(x): [B, T, C]."""
    return x @ p["in_proj_qkv"]["kernel"]
