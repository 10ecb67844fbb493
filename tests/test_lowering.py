"""Every GPU code path lowered for CUDA on this CPU machine, from abstract arrays: no GPU, no data.

`jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))` gives the StableHLO a GPU would
compile; Pallas's Triton kernels lower to `__gpu$xla.gpu.triton` custom calls here too, gradients
included. `Runtime.backend = "gpu"` makes the step take its GPU paths (attention kernel, LoRA
product, ragged experts) while tracing on the CPU. Weights are drawn small and passed as shapes only
(`jax.ShapeDtypeStruct`), so a broken kernel call, a CPU-only op on a GPU path or a dense [T, T] score
tensor in a fused path fails here, before a GPU is lent.

cuDNN attention cannot be lowered this way: `jax.nn.dot_product_attention(implementation="cudnn")`
asks the installed cuDNN for its version while tracing (`check_cudnn_version`, which needs the
jax-cuda plugin's `cuda_versions` module and cuDNN's shared library) and reads the GPU's compute
capability from a live GPU device (`check_compute_capability`). Neither exists on a CPU-only machine,
so its checks stay with the `gpu`-marked tests (`tests/test_attention.py`, `tests/test_gpu.py`).
"""

import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from jaxlora.config import TrainSection
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
from jaxlora.models.attention.gpu import pallas_kernel_missing
from jaxlora.models.generate import _prefill, _step, init_cache
from jaxlora.quant import make_quantizer
from jaxlora.train.optim import make_optimizer
from jaxlora.train.prefs import Preference, PrefSpec
from jaxlora.train.step import StepSpec, make_train_step

T = 384  # three Pallas tiles of 128, and no model dim: a dense score tensor shows as ...x384x384x...
TRITON = "__gpu$xla.gpu.triton"
# The attention a packed GPU step runs: JAX's Pallas kernel where this JAX has it, else the blocked one.
PACKED_ATTENTION = "xla" if pallas_kernel_missing() else "pallas"

LLAMA = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=64,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    LLAMA,
    model_type="qwen3_moe",
    num_experts=16,  # more than 8: `moe_impl: auto` runs ragged experts on a GPU
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def shapes(tree):
    """The tree with every array replaced by its shape and dtype."""
    return jax.eval_shape(lambda t: t, tree)


def model(tmp_path, hf: dict, quant: str = "none", **runtime):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    q = make_quantizer(quant) if quant != "none" else None
    m = load_model(tmp_path, dtype="bfloat16", quantizer=q, random_init_seed=0)
    return m.config.with_runtime(backend="gpu", **runtime), m.params


def lower(fn, *args, static=()) -> str:
    """StableHLO text of `fn(*args)` lowered for CUDA on an H100 (Pallas's Triton lowering reads the
    target GPU from the abstract mesh when no GPU is attached)."""
    h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=h100)
    with use_abstract_mesh(mesh):
        traced = jax.jit(fn, static_argnums=static).trace(*args)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


def sft_text(cfg, params, r: int = 8, batch: int = 2) -> str:
    lc = LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear")
    lora = init_lora(cfg, lc, jax.random.key(0))
    optimizer, _ = make_optimizer(TrainSection(learning_rate=1e-4), 10)
    step = make_train_step(StepSpec(cfg, loss_chunk=128), optimizer)
    ids = jax.ShapeDtypeStruct((1, batch, T), jnp.int32)  # [A, B, T]
    data = {k: ids for k in ("input_ids", "targets", "positions", "segment_ids")}
    args = (Adapter.split(lora), optimizer.init(lora), params, data, jax.random.key(1), lora_scale(cfg, lc))
    return lower(step, *map(shapes, args))


def dense_scores(text: str) -> list[str]:
    """Tensor types holding a [T, T] block: the dense attention the fused paths must not build."""
    return sorted(set(re.findall(rf"tensor<[0-9x]*x{T}x{T}x\w+>", text)))


def test_sft_step_with_pallas_attention_lowers_to_triton(tmp_path):
    """Packed rows, GQA, causal, bf16: the forward and both backward kernels are Triton calls."""
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention="pallas", packed=True)
    if pallas_kernel_missing():  # JAX >= 0.12: refused in one line while tracing, nothing lowered
        with pytest.raises(UserError, match="model.attention=pallas needs jax.experimental") as err:
            sft_text(cfg, params)
        assert "\n" not in str(err.value)
        return
    text = sft_text(cfg, params)
    calls = [line for line in text.splitlines() if f"custom_call @{TRITON}(" in line]
    # in the layer scan: the forward kernel, the backward's preprocessing and its dq/dk/dv kernel
    assert len(calls) >= 3, len(calls)
    assert dense_scores(text) == [], dense_scores(text)
    # What the kernels are handed: q, k and v [B, T, N, H] with all N heads (the kernel has no GQA: the
    # key/value heads are repeated first) and segment ids [B, T] for every token.
    operands = " ".join(line.rsplit(" : (", 1)[1] for line in calls)
    heads = set(re.findall(rf"tensor<2x{T}x(\d+)x64xbf16>", operands))
    assert heads == {str(cfg.num_heads)}, heads
    assert set(re.findall(r"tensor<([0-9x]+)xi32>", operands)) == {f"2x{T}"}


def test_auto_on_packed_gpu_rows_lowers_without_dense_scores(tmp_path):
    """`auto` on a GPU with packing: Pallas where JAX has it, else the notice and the dense reference;
    the blocked `xla` kernel builds no [T, T] scores either."""
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention=PACKED_ATTENTION)
    text = sft_text(cfg, params)
    assert dense_scores(text) == []
    assert (TRITON in text) == (PACKED_ATTENTION == "pallas")
    ref, _ = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention="reference")
    assert dense_scores(sft_text(ref, params)) != []  # the check sees a dense path when there is one


def test_dpo_step_lowers(tmp_path):
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention=PACKED_ATTENTION)
    lc = LoraConfig(r=8, alpha=16, target_modules="all-linear")
    lora = init_lora(cfg, lc, jax.random.key(0))
    optimizer, _ = make_optimizer(TrainSection(learning_rate=1e-4), 10)
    step = make_train_step(Preference(StepSpec(cfg, loss_chunk=128), PrefSpec("dpo")), optimizer)
    ids = jax.ShapeDtypeStruct((1, 2, T), jnp.int32)
    keys = ("input_ids", "targets", "positions", "segment_ids")
    data = {f"{side}_{k}": ids for side in ("chosen", "rejected") for k in keys}
    args = (Adapter.split(lora), optimizer.init(lora), params, data, jax.random.key(1), lora_scale(cfg, lc))
    text = lower(step, *map(shapes, args))
    assert dense_scores(text) == []
    assert (TRITON in text) == (PACKED_ATTENTION == "pallas")


def test_moe_step_with_ragged_experts_lowers(tmp_path):
    cfg, params = model(tmp_path, QWEN3_MOE, compute_dtype="bfloat16", attention=PACKED_ATTENTION)
    assert cfg.runtime.moe_impl == "auto" and cfg.num_experts == 16
    text = sft_text(cfg, params)
    assert "ragged_dot" in text  # grouped matmuls, not the dense every-expert path
    dense, _ = model(tmp_path, QWEN3_MOE, compute_dtype="bfloat16", moe_impl="dense")
    assert "ragged_dot" not in sft_text(dense, params)


@pytest.mark.parametrize("quant,stored", [("int8", "i8"), ("nf4", "ui8")])
def test_quantized_base_step_lowers_with_quantized_arguments(tmp_path, quant, stored):
    """The frozen kernels enter the step in their stored dtype and are dequantized inside it."""
    cfg, params = model(tmp_path, LLAMA, quant=quant, compute_dtype="bfloat16", attention=PACKED_ATTENTION)
    text = sft_text(cfg, params)
    main = text[text.index("func.func public @main") :].split("\n", 1)[0]
    assert re.search(rf"tensor<[0-9x]+x{stored}>", main), main[:2000]
    # no argument carries a dense bfloat16 [in, out] kernel of the adapted projections
    assert not re.search(r"tensor<2x256x512xbf16>", main), main[:2000]


def test_generation_prefill_and_decode_lower(tmp_path):
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16")
    lc = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    lora = shapes(init_lora(cfg, lc, jax.random.key(0)))
    scale = shapes(lora_scale(cfg, lc))
    b, prompt, new = 2, 24, 8
    cache = shapes(init_cache(cfg, b, prompt + new))
    ids = jax.ShapeDtypeStruct((b, prompt), jnp.int32)
    prefill = lower(_prefill.__wrapped__, shapes(params), cfg, cache, ids, ids, lora, scale, static=(1,))
    token = jax.ShapeDtypeStruct((b,), jnp.int32)
    decode = lower(_step.__wrapped__, shapes(params), cfg, cache, token, token, lora, scale, static=(1,))
    for text in (prefill, decode):
        assert f"tensor<{b}x{cfg.vocab_size}xf32>" in text  # the last position's logits
    # decode reads the cache [L, B, S, K, H] and writes one slot
    assert f"tensor<2x{b}x{prompt + new}x2x64xbf16>" in decode
