"""[gpu] On an NVIDIA GPU: bfloat16 logits of every family against transformers on CUDA, int8/nf4 `qmatmul`
against dequantize-then-matmul, and a bfloat16 stories260K fine-tune that tracks the float32 CPU run.

Every test is marked `gpu` (skipped without one; `benchmarks/gpu_suite.sh` runs them on the H200). The
tiny models are built here with transformers (tests/helpers/hf_tiny.py); stories260K comes from the test
assets, which `benchmarks/device_wheels.sh` copies into `.whl/assets` for the device machine.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.config import TrainSection
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.models import forward, load_model
from jaxlora.quant import dequantize, qmatmul, quantize
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import StepSpec, make_train_step
from tests.helpers.hf_tiny import FAMILIES, make_hf_model, padded_batch

pytestmark = pytest.mark.gpu


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (bfloat16 rounds each value by up to 2^-8: norms, not max, compare)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def on_gpu(x) -> bool:
    return all(d.platform == "gpu" for d in x.devices())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_transformers_on_cuda(family, tmp_path):
    """bf16 weights and compute on both sides (transformers: sdpa on CUDA), same padded batch."""
    from transformers import AutoModelForCausalLM

    hf32 = make_hf_model(family, tmp_path)  # float32, CPU: the reference both are printed against
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    hf = hf.to("cuda").eval()
    model = load_model(tmp_path, dtype="bfloat16")
    ids, mask, pos = padded_batch(model.config.vocab_size)
    t = {k: torch.tensor(v, dtype=torch.long) for k, v in (("ids", ids), ("mask", mask), ("pos", pos))}
    with torch.no_grad():
        ref = (
            hf(input_ids=t["ids"].cuda(), attention_mask=t["mask"].cuda(), position_ids=t["pos"].cuda())
            .logits.float()
            .cpu()
            .numpy()
        )
        ref32 = hf32(input_ids=t["ids"], attention_mask=t["mask"], position_ids=t["pos"]).logits.numpy()
    out = forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    assert on_gpu(out) and model.config.runtime.compute_dtype == "bfloat16"  # logits come back in float32
    ours = np.asarray(out, np.float32)
    keep = mask == 1  # padded positions are undefined on both sides
    err = rel_err(ours[keep], ref[keep])
    ours32, theirs32 = rel_err(ours[keep], ref32[keep]), rel_err(ref[keep], ref32[keep])
    print(
        f"{family}: bf16 relative error jaxlora vs transformers (CUDA) {err:.2e}; "
        f"vs float32 CPU: jaxlora {ours32:.2e}, transformers {theirs32:.2e}"
    )
    # The bound is 1e-2 against transformers. On these tiny random models each bf16 run is itself
    # ~1-2% (L2) away from float32 (bf16 on XLA:CPU: transformers 1.3-1.8%, jaxlora 0.8-2.1%), so two
    # independent roundings can differ by more than 1e-2; then jaxlora must be as close to float32 as
    # transformers is (within 1.5x). A wrong mask, scale or layout is off by far more than 5e-2.
    assert err < 1e-2 or (err < 5e-2 and ours32 <= 1.5 * theirs32), (err, ours32, theirs32)


@pytest.mark.parametrize("method", ["int8", "nf4", "mxfp4"])
def test_qmatmul_matches_dequantize_then_matmul_on_gpu(method):
    """Forward and input gradient, bf16 on the GPU, against the dense kernel (GPU bf16 and CPU float32)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 384)) * 0.05).astype(np.float32)  # [in, out]
    x32 = rng.standard_normal((4, 16, 256)).astype(np.float32)  # [B, T, in]
    cot = rng.standard_normal((4, 16, 384)).astype(np.float32)  # [B, T, out]
    q = jax.device_put(quantize(w, method), jax.devices("gpu")[0])
    x = jnp.asarray(x32, jnp.bfloat16)

    def loss_q(x):
        return jnp.sum(qmatmul(x, q, jnp.bfloat16).astype(jnp.float32) * cot)

    def loss_dense(x):
        return jnp.sum((x @ dequantize(q, jnp.bfloat16)).astype(jnp.float32) * cot)

    y_q = jax.jit(lambda x: qmatmul(x, q, jnp.bfloat16))(x)
    y_d = jax.jit(lambda x: x @ dequantize(q, jnp.bfloat16))(x)
    g_q, g_d = jax.jit(jax.grad(loss_q))(x), jax.jit(jax.grad(loss_dense))(x)
    assert on_gpu(y_q) and on_gpu(g_q) and y_q.dtype == jnp.bfloat16
    w_deq = np.asarray(jax.device_get(dequantize(q, jnp.float32)))
    y_ref = x32 @ w_deq  # float32 on the host: what both approximate
    errs = {
        "y qmatmul vs dense (bf16 GPU)": rel_err(y_q.astype(jnp.float32), y_d.astype(jnp.float32)),
        "y qmatmul vs float32 host": rel_err(y_q.astype(jnp.float32), y_ref),
        "dx qmatmul vs dense (bf16 GPU)": rel_err(g_q.astype(jnp.float32), g_d.astype(jnp.float32)),
        "dx qmatmul vs float32 host": rel_err(g_q.astype(jnp.float32), cot @ w_deq.T),
    }
    print(f"{method}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert errs["y qmatmul vs dense (bf16 GPU)"] < 1e-3 and errs["dx qmatmul vs dense (bf16 GPU)"] < 1e-3
    assert errs["y qmatmul vs float32 host"] < 1e-2 and errs["dx qmatmul vs float32 host"] < 1e-2


# --- a short stories260K fine-tune: bfloat16 on the GPU tracks float32 on the CPU -------------------------

STEPS = 20


def finetune_losses(stories_dir, device, dtype: str, steps: int = STEPS) -> list[float]:
    """Losses of `steps` LoRA (r8, all-linear) AdamW steps at lr 1e-3 on the golden story text, on `device`.

    The same four [1, 4, 48] batches cycle: windows of the golden greedy story's 200 tokens, shuffled, so
    that the model does not already predict them (the loss falls from 10.7 to 5.0 in 20 steps, smoothly).
    The LoRA init and the optimizer are the same for every device and dtype; only the base dtype and the
    compute differ.
    """
    tokens = np.asarray(json.loads((stories_dir / "golden_greedy.json").read_text())["greedy_token_ids"])
    tokens = np.random.default_rng(0).permutation(tokens)
    seq, rows = 48, 4
    starts = np.arange(4 * rows) * ((len(tokens) - seq - 1) // (4 * rows))
    windows = np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int32)  # [16, seq + 1]
    batches = [
        {
            "input_ids": w[None, :, :-1],  # [1, B, T]
            "targets": w[None, :, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)).copy(),
            "segment_ids": np.ones((1, rows, seq), np.int32),
        }
        for w in np.split(windows, 4)
    ]
    with jax.default_device(device):
        model = load_model(stories_dir, dtype=dtype)
        lora_cfg = LoraConfig(r=8, alpha=16.0, dropout=0.0, target_modules="all-linear")
        lora = init_lora(model.config, lora_cfg, jax.random.key(1))
        scale = jnp.asarray(lora_scale(model.config, lora_cfg))
        train = TrainSection(learning_rate=1e-3, warmup_steps=0, lr_schedule="constant", max_steps=steps)
        optimizer, _ = make_optimizer(train, steps)
        opt_state, lora = optimizer.init(lora), Adapter.split(lora)
        step = jax.jit(make_train_step(StepSpec(model.config, 0.0, 1024), optimizer))
        losses = []
        for i in range(steps):
            batch = {k: jnp.asarray(v) for k, v in batches[i % len(batches)].items()}
            lora, opt_state, metrics = step(lora, opt_state, model.params, batch, jax.random.key(i), scale)
            losses.append(float(metrics["loss"]))
        assert all(d == device for d in metrics["loss"].devices())
    return losses


# Each bf16 loss within 2% of the float32 one. bfloat16 keeps 8 significant bits (relative rounding up to
# 2^-9 = 0.2% per weight and activation); over 5 layers and 20 AdamW steps on the same data the loss moves
# by a few tenths of a percent (0.25% worst here with bfloat16 on XLA:CPU), so 2% leaves room for GPU
# summation orders while still catching a wrong mask, scale or update, which move it by far more.
LOSS_RTOL = 0.02


def test_bf16_finetune_on_gpu_tracks_float32_on_cpu(stories_dir):
    ref = finetune_losses(stories_dir, jax.devices("cpu")[0], "float32")
    got = finetune_losses(stories_dir, jax.devices("gpu")[0], "bfloat16")
    rel = [abs(g - r) / abs(r) for g, r in zip(got, ref, strict=True)]
    for i, (g, r, e) in enumerate(zip(got, ref, rel, strict=True)):
        print(f"step {i + 1:2d}: bf16 GPU {g:.5f}  float32 CPU {r:.5f}  rel {e:.2e}")
    print(f"worst relative loss difference {max(rel):.2e} (tolerance {LOSS_RTOL})")
    assert ref[-1] < 0.7 * ref[0]  # the run learns: the comparison is not between two flat lines
    assert max(rel) < LOSS_RTOL
