"""[quant] MXFP4 as a frozen 4-bit base (`quant.weights: mxfp4`): a gpt-oss checkpoint's MXFP4 experts kept
bit for bit (against transformers' dequantization and logits), the OCP MX encoder against a brute-force
reference, the abstract shapes `jaxlora plan` counts, and a stories260K fine-tune on an mxfp4 base whose
merged export equals what was trained."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlora.cli.export import lora_from_run, run_export
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.lora import lora_scale
from jaxlora.models import forward, load_model
from jaxlora.quant import QuantizedTensor, dequantize, dequantize_params, make_quantizer, nbytes, quantize
from jaxlora.quant.abstract import abstract_quantize
from jaxlora.quant.mxfp4 import FP4_E2M1
from jaxlora.train import train
from tests.helpers.mxfp4_ckpt import make_gpt_oss, pack_saved_experts, transformers_dequantized
from tests.helpers.peft_torch import hf_model, jax_logits, token_ids, torch_logits
from tests.helpers.recipes import run_config

EXPERTS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(MXFP4 folder, float reference folder, torch model): a tiny gpt-oss whose experts are MXFP4 on disk;
    the reference and the torch model hold transformers' dequantization of those blocks."""
    root = tmp_path_factory.mktemp("gpt_oss")
    hf = make_gpt_oss(root / "float")
    packed, ref = pack_saved_experts(hf, root)
    return packed, ref, hf


def test_checkpoint_experts_kept_bit_for_bit(gpt_oss):
    """With quant.weights mxfp4 the experts' codes and scales are the checkpoint's bytes (transposed to
    [E, in / 2, out] and [E, in / 32, out]) and dequantize, in JAX, bit-equal to transformers'
    `convert_moe_packed_tensors` and to the host dequantization of a float load; the attention kernels,
    stored in float, are encoded by jaxlora; embeddings, norms, the router and biases stay float."""
    packed, _, _ = gpt_oss
    model = load_model(packed, quantizer=make_quantizer("mxfp4"))
    floats = load_model(packed)  # the reader's host dequantization
    stored = load_file(packed / "model.safetensors")
    layers = model.params["layers"]
    for proj in EXPERTS:
        q = layers["moe"][proj]["kernel"]
        assert isinstance(q, QuantizedTensor) and q.method == "mxfp4" and q.pad == 0
        for i in range(model.config.num_layers):
            blocks = stored[f"model.layers.{i}.mlp.experts.{proj}_blocks"]  # [E, out, in / 32, 16]
            scales = stored[f"model.layers.{i}.mlp.experts.{proj}_scales"]  # [E, out, in / 32]
            codes = np.swapaxes(blocks.reshape(*blocks.shape[:2], -1), -1, -2)
            assert np.array_equal(np.asarray(q.data[i]), codes)
            assert np.array_equal(np.asarray(q.scale[i]), np.swapaxes(scales, -1, -2))
            ours = np.asarray(dequantize(jax.tree.map(lambda a, i=i: a[i], q), jnp.float32))
            ref = transformers_dequantized(blocks, scales)
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
            assert np.array_equal(ours, np.asarray(floats.params["layers"]["moe"][proj]["kernel"][i]))
    assert layers["attn"]["q_proj"]["kernel"].method == "mxfp4"
    for leaf in (layers["moe"]["router"]["kernel"], model.params["embed"]["embedding"]):
        assert not isinstance(leaf, QuantizedTensor)


def test_mxfp4_base_logits(gpt_oss):
    """float32 logits of the mxfp4 base: with attention left float (quant.skip), the weights are exactly
    the reference checkpoint's, so they equal transformers' on it; with everything quantized, they equal
    the dense model holding the dequantized kernels (qmatmul and scan slicing read the codes right)."""
    packed, _, hf = gpt_oss
    ids = token_ids(128)
    skip = ("lm_head", "embed_tokens", "self_attn")
    experts_only = load_model(packed, quantizer=make_quantizer("mxfp4", skip=skip))
    assert not isinstance(experts_only.params["layers"]["attn"]["q_proj"]["kernel"], QuantizedTensor)
    ref = torch_logits(hf, ids)
    np.testing.assert_allclose(jax_logits(experts_only, ids), ref, atol=1e-5, rtol=1e-5)
    model = load_model(packed, quantizer=make_quantizer("mxfp4"))
    dense = load_model(packed)
    dense.params = dequantize_params(model.params, jnp.float32)
    got = jax_logits(model, ids)
    np.testing.assert_allclose(got, jax_logits(dense, ids), atol=1e-6, rtol=1e-6)
    assert np.abs(got - ref).max() > 1e-4  # attention encoded to 4 bits: not the float model


def _nearest_reference(x: np.ndarray, n_in: int):
    """Brute force per block of 32 along axis 0 of x [in, out], in float64 with `math`: (scale exponent
    floor(log2 amax) - 2 clamped to [-127, 127], the distance of each value to its block's nearest e2m1
    value (saturating at 6), whether each value sits at a tie)."""
    grid = np.unique(FP4_E2M1.astype(np.float64))  # 15 values, -6 .. 6
    exps = np.zeros((math.ceil(n_in / 32), x.shape[1]), np.int64)
    dist, tie = np.zeros(x.shape), np.zeros(x.shape, bool)
    for b in range(exps.shape[0]):
        for o in range(x.shape[1]):
            block = x[b * 32 : (b + 1) * 32, o].astype(np.float64)
            amax = max(abs(v) for v in block)
            exps[b, o] = -127 if amax == 0 else min(127, max(-127, math.floor(math.log2(amax)) - 2))
            d = np.abs(block[:, None] - grid[None, :] * 2.0 ** exps[b, o])  # [32, 15]
            dist[b * 32 : (b + 1) * 32, o] = d.min(axis=1)
            tie[b * 32 : (b + 1) * 32, o] = (d == d.min(axis=1, keepdims=True)).sum(axis=1) > 1
    return exps, dist, tie


def test_encoder_rounds_to_nearest_of_each_block():
    """A random [72, 24] matrix (72 rows: the last block padded) with some zero, tiny, huge and exact-tie
    blocks: each e8m0 scale is floor(log2 amax) - 2 + 127, each dequantized value is a nearest e2m1 value
    of its block (ties to the even code), and the JAX dequantization equals numpy's table look-up."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((72, 24)) * np.exp2(rng.integers(-8, 8, (1, 24)))).astype(np.float32)
    x[:32, 0] = 0.0  # all-zero block: scale byte 0
    x[:32, 1] *= np.float32(2.0**-130)  # below e8m0's range: clamped to 2 ** -127
    x[:32, 2] = np.float32(2.0**120) * np.linspace(-8, 8, 32, dtype=np.float32)  # at the top of the range
    x[:32, 3] = np.array([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4, np.float32)  # scale 1: ties
    q = quantize(x, "mxfp4")
    assert q.data.shape == (48, 24) and q.scale.shape == (3, 24) and q.pad == 24
    exps, dist, tie = _nearest_reference(x, 72)
    assert np.array_equal(q.scale.astype(np.int64), exps + 127)
    assert q.scale[0, 0] == 0 and q.scale[0, 1] == 0 and q.scale[0, 3] == 127
    got = np.asarray(dequantize(q, jnp.float32)).astype(np.float64)
    np.testing.assert_array_equal(np.abs(got - x), dist)  # exact: a nearest value, saturating at 6
    codes = np.stack([q.data & 15, q.data >> 4], axis=1).reshape(96, 24)[:72]
    assert tie.sum() >= 7 and np.all(codes[tie] % 2 == 0)  # ties to even
    table = FP4_E2M1[codes] * np.exp2(np.repeat(q.scale.astype(np.float64) - 127, 32, axis=0)[:72])
    np.testing.assert_array_equal(got, table)
    with pytest.raises(UserError, match="mxfp4 has blocks of 32 values: set quant.block_size to null"):
        quantize(x, "mxfp4", block_size=64)


def test_abstract_mxfp4_is_quantize_and_4_25_bits():
    """`jaxlora plan`'s abstract kernel has the structure, shapes and dtypes of `quantize`'s (padding
    included), and 4.25 bits a weight (codes + one scale byte per 32)."""
    for lead, kernel in (((2,), (172, 40)), ((), (64, 96))):
        real = quantize(np.ones((*lead, *kernel), np.float32), "mxfp4")
        abstract = abstract_quantize(lead, kernel, "mxfp4")
        assert jax.tree.structure(real) == jax.tree.structure(abstract)
        for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
            assert r.shape == a.shape and r.dtype == a.dtype
    assert nbytes(abstract_quantize((24, 32), (2880, 5760), "mxfp4")) * 8 / (24 * 32 * 2880 * 5760) == 4.25


def test_mxfp4_base_finetune_and_merged_export(assets, tmp_path):
    """stories260K's Alpaca recipe on an mxfp4 base (every linear encoded by jaxlora; down_proj's in = 172
    padded): the eval loss falls, and the merged export (the adapter added to the dequantized mxfp4 base,
    as for nf4) gives in transformers the logits of the trained adapter on the mxfp4 base in jaxlora."""
    out = tmp_path / "run"
    over = {"train.max_steps": 20, "train.eval_every_steps": 20, "train.eval_batches": 2}
    over.update({"checkpoint.every_steps": None, "quant.weights": "mxfp4"})
    result = train(config_from_dict(run_config(assets, out, **over)))
    before, after = result.eval_history[0][1], result.eval_history[-1][1]
    assert after <= 0.85 * before, (before, after)
    merged = run_export(None, None, "merged", str(tmp_path / "merged"), run=str(out))
    run_cfg, lora, _ = lora_from_run(out)
    base = load_model(run_cfg.model.path, quantizer=make_quantizer("mxfp4"))
    assert base.params["layers"]["mlp"]["down_proj"]["kernel"].pad == 20
    ids = np.array([[1, 403, 407, 261, 378, 432, 383, 286]])
    scale = jnp.asarray(lora_scale(base.config, run_cfg.lora))
    ours = np.asarray(forward(base.params, base.config, jnp.asarray(ids), lora=lora, lora_scale=scale))
    np.testing.assert_allclose(torch_logits(hf_model(merged), ids), ours, atol=1e-4, rtol=1e-4)
