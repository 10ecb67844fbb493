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
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models import load_model
from jaxlora.models.attention.flash import flash_tiles
from jaxlora.models.attention.gpu import pallas_attention
from jaxlora.models.generate import _prefill, _step, init_cache
from jaxlora.quant import make_quantizer
from jaxlora.train.optim import make_optimizer
from jaxlora.train.prefs import Preference, PrefSpec
from jaxlora.train.step import StepSpec, make_train_step

T = 384  # three Pallas tiles of 128, and no model dim: a dense score tensor shows as ...x384x384x...
TRITON = "__gpu$xla.gpu.triton"
PACKED_ATTENTION = "pallas"  # what `auto` runs for packed rows on a GPU (cuDNN cannot keep them apart)
KERNELS = ["flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"]  # jaxlora's, sorted

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


def _read_later(lines: list[str], name: str) -> bool:
    """Whether SSA value `name` (defined just before `lines`) is read before its region closes."""
    depth = 0
    for line in lines:
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)  # no braces from string attributes
        if re.search(rf"{re.escape(name)}(?!\w)", line.split(" = ", 1)[-1]):
            return True
        depth += line.count("{") - line.count("}")
        if depth < 0:
            return False
    return False


def triton_kernels(text: str, live: bool = False) -> list[str]:
    """The names of the Triton kernels `text` calls, one entry per call site; with `live`, only the calls
    whose results are read (XLA drops the others: the calls have no side effect)."""
    lines = text.splitlines()
    names = []
    for i, line in enumerate(lines):
        if f"custom_call @{TRITON}(" not in line:
            continue
        assert "has_side_effect" not in line
        result = line.split("=", 1)[0].strip().split(":")[0]  # e.g. %72 of "%72:2 = ..."
        if not live or _read_later(lines[i + 1 :], result):
            names.append(re.search(r'name = "(\w+)"', line).group(1))
    return names


def test_sft_step_with_pallas_attention_lowers_to_triton(tmp_path):
    """Packed rows, GQA, causal, bf16: jaxlora's forward, dq and dk/dv kernels are Triton calls. Under the
    `lean` remat policy the forward kernel runs once: its named residuals are kept, not recomputed (JAX
    0.11 leaves a dead copy of the forward call in the rematerialized backward; nothing reads it)."""
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention="pallas", packed=True)
    assert cfg.runtime.remat == "lean"
    text = sft_text(cfg, params)
    # in the layer scan: the forward kernel, then the backward's dq and dk/dv kernels
    assert sorted(triton_kernels(text, live=True)) == KERNELS, triton_kernels(text)
    assert dense_scores(text) == [], dense_scores(text)
    # What the kernels are handed: q [B, T, N, H] and k/v [B, T, K, H] with the K key heads (GQA through
    # the index maps, never repeated), and segment ids and positions [B, T] for every token.
    calls = [line for line in text.splitlines() if f"custom_call @{TRITON}(" in line]
    operands = " ".join(line.rsplit(" : (", 1)[1] for line in calls)
    heads = set(re.findall(rf"tensor<2x{T}x(\d+)x64xbf16>", operands))
    assert heads == {str(cfg.num_heads), str(cfg.num_kv_heads)}, heads
    assert f"tensor<2x{T}xi32>" in operands


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pallas_windows_softcap_and_sinks_lower_to_triton(dtype):
    """Every feature of the Pallas kernel at once (a traced window, soft-capping, sinks, G = 3 query heads
    per key head, head dim 80 padded to 128, T = 300 padded to whole tiles), forward and backward with
    d sinks: three Triton kernels and no dense [T, T] tensor."""
    b, t, n, kh, h = 2, 300, 6, 2, 80

    def grads(q, k, v, pos, seg, window, sinks):
        def loss(q, k, v, sinks):
            out = pallas_attention(q, k, v, pos, seg, window, 30.0, sinks=sinks)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, (0, 1, 2, 3))(q, k, v, sinks)

    s = jax.ShapeDtypeStruct
    args = [s((b, t, m, h), jnp.dtype(dtype)) for m in (n, kh, kh)]
    args += [s((b, t), jnp.int32), s((b, t), jnp.int32), s((), jnp.int32), s((n,), jnp.float32)]
    text = lower(grads, *args)
    assert sorted(triton_kernels(text)) == KERNELS
    tp = flash_tiles(t, h, jnp.dtype(dtype).itemsize).length  # T padded to whole tiles
    for length in (t, tp):
        assert not re.findall(rf"tensor<[0-9x]*x{length}x{length}x\w+>", text), length


def test_auto_on_packed_gpu_rows_lowers_without_dense_scores(tmp_path):
    """`auto` on a GPU with packing runs the Pallas kernel (cuDNN cannot keep packed examples apart);
    the dense reference would build [T, T] scores, and the check sees them."""
    cfg, params = model(tmp_path, LLAMA, compute_dtype="bfloat16", attention="auto")
    text = sft_text(cfg, params)
    assert dense_scores(text) == []
    assert "flash_attention_fwd" in triton_kernels(text)
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
    assert "flash_attention_fwd" in triton_kernels(text)


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
