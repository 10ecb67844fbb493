"""MXFP4 checkpoints (gpt-oss's `X_blocks` / `X_scales`): the dequantization against transformers' own
(`convert_moe_packed_tensors`), the safetensors reader's pairs, the quantization_config check, and a
tiny Qwen3-MoE and a tiny gpt-oss whose experts are stored as MXFP4, loaded in float32 against
transformers and as int8 / NF4 bases."""

import json
import tracemalloc

import jax
import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.models import load_model
from jaxlora.models.config import config_from_hf
from jaxlora.models.safetensors_io import CheckpointReader, write_safetensors
from jaxlora.quant import QuantizedTensor, make_quantizer
from jaxlora.quant.mxfp4 import dequantize_mxfp4, mxfp4_shape
from tests.helpers.hf_tiny import make_hf_model
from tests.helpers.mxfp4_ckpt import (
    encode_mxfp4,
    make_gpt_oss,
    pack_saved_experts,
    transformers_dequantized,
    write_random_gpt_oss_mxfp4,
)
from tests.helpers.peft_torch import jax_logits, token_ids, torch_logits

E, D, F = 4, 64, 96  # experts, hidden, expert width


def _random_pair(rng, rows: int, groups: int, low: int = 0, high: int = 255):
    blocks = rng.integers(0, 256, (E, rows, groups, 16), dtype=np.uint8)
    return blocks, rng.integers(low, high, (E, rows, groups), dtype=np.uint8)


@pytest.mark.parametrize("proj", ["gate_up_proj", "down_proj"])
def test_dequantize_equals_transformers_bit_for_bit(proj):
    """Every byte value and every scale byte but 255 (NaN in the MX spec): gpt-oss's gate_up_proj
    (blocks [E, 2F, D / 32, 16] -> [E, D, 2F]) and down_proj ([E, D, F / 32, 16] -> [E, F, D]), including
    the values that overflow to inf at the largest scales and -0.0."""
    rng = np.random.default_rng(0)
    rows, width = (2 * F, D) if proj == "gate_up_proj" else (D, F)
    blocks, scales = _random_pair(rng, rows, width // 32)
    ours = dequantize_mxfp4(blocks, scales, proj)
    ref = transformers_dequantized(blocks, scales)
    assert ours.shape == ref.shape == mxfp4_shape(blocks.shape, scales.shape) == (E, width, rows)
    assert ours.flags.c_contiguous and ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isinf(ref).any() and (np.signbit(ref) & (ref == 0)).any()  # both edges were exercised


def test_mismatched_pair_is_refused_in_one_line(tmp_path):
    """A uint8 pair whose shapes do not fit is refused naming the folder and tensor; a float pair with
    the same suffixes is no MXFP4 pair."""
    with pytest.raises(
        UserError, match=r"^MXFP4 tensor w: w_blocks \[4, 8, 2, 16\] and w_scales \[4, 8, 3\]"
    ):
        mxfp4_shape((4, 8, 2, 16), (4, 8, 3), "w")
    write_safetensors(
        tmp_path / "model.safetensors",
        {"w_blocks": np.zeros((4, 8, 2, 16), np.uint8), "w_scales": np.zeros((4, 8, 3), np.uint8)},
    )
    with pytest.raises(UserError, match=f"^{tmp_path}: MXFP4 tensor w: .* do not fit") as err:
        CheckpointReader(tmp_path)
    assert "\n" not in str(err.value)
    floats = {"v_blocks": np.zeros((2, 3), np.float32), "v_scales": np.zeros(2, np.float32)}
    write_safetensors(tmp_path / "model.safetensors", floats)  # not uint8: ordinary tensors
    assert sorted(CheckpointReader(tmp_path).names()) == ["v_blocks", "v_scales"]


def test_reader_dequantizes_pairs_across_shards(tmp_path):
    """A sharded checkpoint with X_blocks and X_scales in different files: the reader shows X (not the
    pair) with its dequantized shape, and reads it as transformers does; the test encoder is within 2
    scale units of the float weights (half the widest e2m1 step, 4 to 6; block maxima up to 8 clip to 6)."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (E, D, 2 * F)).astype(np.float32)  # gpt-oss's gate_up_proj layout
    blocks, scales = encode_mxfp4(w)
    assert blocks.shape == (E, 2 * F, D // 32, 16) and scales.shape == (E, 2 * F, D // 32)
    x = "model.layers.0.mlp.experts.gate_up_proj"
    norm = rng.normal(size=D).astype(np.float32)
    write_safetensors(tmp_path / "a.safetensors", {f"{x}_blocks": blocks, "model.norm.weight": norm})
    write_safetensors(tmp_path / "b.safetensors", {f"{x}_scales": scales})
    index = {
        f"{x}_blocks": "a.safetensors",
        "model.norm.weight": "a.safetensors",
        f"{x}_scales": "b.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted([x, "model.norm.weight"]) and x in reader
    assert f"{x}_blocks" not in reader and reader.shape(x) == (E, D, 2 * F)
    got = reader.get(x)
    assert np.array_equal(got, transformers_dequantized(blocks, scales))
    assert np.array_equal(reader.get("model.norm.weight"), norm)
    unit = np.exp2(scales.astype(np.float64) - 127)  # the value 1.0 at the block's scale
    bound = 2 * np.repeat(np.swapaxes(unit, -1, -2), 32, axis=-2)  # [E, D, 2F]
    assert np.all(np.abs(got - w) <= bound) and np.abs(got - w).max() > 0


def test_quantization_config_mxfp4_accepted_others_refused():
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1).to_dict()
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    assert config_from_hf(hf).hidden_size == 32
    hf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(
        UserError, match=r"^config.json: quantization_config with quant_method 'gptq' is not"
    ) as e:
        config_from_hf(hf)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (MXFP4 folder, float reference folder, torch model), each built once: a tiny model saved
    by transformers, its experts (Qwen3-MoE's fused [E, 2F, D] gate_up_proj and [E, D, F] down_proj, in
    place of the hub's per-expert tensors; gpt-oss's [E, D, 2F] and [E, F, D], as on the hub) rewritten as
    MXFP4; the reference and the torch model hold transformers' dequantization of those blocks."""
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            if family == "gpt_oss":
                hf, drop = make_gpt_oss(root / "float"), ""
            else:
                hf = make_hf_model(family, root / "float", hidden_size=D, moe_intermediate_size=F // 2)
                drop = ".mlp.experts."
            cache[family] = (*pack_saved_experts(hf, root, drop), hf)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_mxfp4_checkpoint_loads_to_transformers_logits(family, built):
    packed, _, hf = built(family)
    model = load_model(packed)
    ids = token_ids(model.config.vocab_size)
    np.testing.assert_allclose(jax_logits(model, ids), torch_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_mxfp4_checkpoint_requantizes_like_its_float_weights(family, quant, built):
    """Loaded with quant.weights int8 / nf4, the MXFP4 checkpoint gives the same base, bit for bit, as
    the float checkpoint holding its dequantized values (dequantize, then quantize as any float base)."""
    packed, ref, _ = built(family)
    a = load_model(packed, dtype="bfloat16", quantizer=make_quantizer(quant))
    b = load_model(ref, dtype="bfloat16", quantizer=make_quantizer(quant))
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    moe_params = a.params["layers"]["moe"]
    assert isinstance(moe_params["gate_up_proj"]["kernel"], QuantizedTensor)
    assert isinstance(moe_params["down_proj"]["kernel"], QuantizedTensor)


def test_loading_holds_one_float32_expert_tensor_at_a_time(tmp_path):
    """A 16-layer gpt-oss with MXFP4 experts loaded as an NF4 base: the host allocations (numpy's, traced)
    peak under half of one weight's stack in float32 (gate_up_proj, [16, E, D, 2F]), i.e. the loader
    dequantizes and quantizes one tensor of one layer at a time, not the stack or the checkpoint."""
    layers, experts, hidden, width = 16, 4, 256, 256
    sizes = dict(num_local_experts=experts, hidden_size=hidden, intermediate_size=width)
    write_random_gpt_oss_mxfp4(tmp_path, num_hidden_layers=layers, **sizes)
    stack_f32 = layers * experts * hidden * 2 * width * 4
    tracemalloc.start()
    try:
        model = load_model(tmp_path, dtype="bfloat16", quantizer=make_quantizer("nf4"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(model.params["layers"]["moe"]["gate_up_proj"]["kernel"], QuantizedTensor)
    assert peak < stack_f32 / 2, (
        f"peak {peak / 2**20:.2f} MiB; gate_up_proj in float32 {stack_f32 / 2**20} MiB"
    )


def test_mxfp4_base_reencodes_pairs_blocked_along_out(built):
    """Qwen3-MoE's fused experts are stored [E, out, in], so their MXFP4 blocks run along `out`: with
    quant.weights mxfp4 they cannot be kept as stored and are dequantized and encoded along `in`, giving
    the base of the float checkpoint holding the same values, bit for bit."""
    packed, ref, _ = built("qwen3_moe")
    a = load_model(packed, quantizer=make_quantizer("mxfp4"))
    b = load_model(ref, quantizer=make_quantizer("mxfp4"))
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.params["layers"]["moe"]["gate_up_proj"]["kernel"].method == "mxfp4"
