"""PEFT and transformers references for the adapter tests: matching jaxlora/PEFT LoRA configs, random
adapters on both sides, logits of a jaxlora model and of a torch model on the same token ids, and checks
that PEFT loads an adapter without a warning and that two adapter files hold the same tensors."""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jaxlora.lora import LoraConfig, lora_scale
from jaxlora.models import forward

fwd = jax.jit(forward, static_argnums=1)


def qv(family: str) -> list[str]:
    return ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]


def jl_config(family: str, setting: str, **kw) -> LoraConfig:
    if setting == "r8_qv":
        return LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=qv(family), **kw)
    return LoraConfig(r=16, alpha=32, dropout=0.0, use_rslora=True, target_modules="all-linear", **kw)


def peft_config(family: str, setting: str, **kw) -> PeftLoraConfig:
    kw.setdefault("fan_in_fan_out", family == "gpt2")  # GPT-2's Conv1D (PEFT warns and sets it otherwise)
    if setting == "r8_qv":
        return PeftLoraConfig(r=8, lora_alpha=16, target_modules=qv(family), task_type="CAUSAL_LM", **kw)
    return PeftLoraConfig(
        r=16, lora_alpha=32, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM", **kw
    )


def randomized(lora: dict, seed: int, std: float = 0.1) -> dict:
    """Non-zero random A and B (B is 0 after init), drawn on the host."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * std), lora)


def randomize_peft_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def token_ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(2, 10)).astype(np.int32)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def jax_logits(model, ids, lora=None, lora_cfg=None) -> np.ndarray:
    scale = 1.0 if lora is None else jnp.asarray(lora_scale(model.config, lora_cfg))
    return np.asarray(fwd(model.params, model.config, jnp.asarray(ids), lora=lora, lora_scale=scale))


@contextlib.contextmanager
def peft_warnings_are_errors():
    """Any warning while loading (PEFT's "Found missing adapter keys", config keys it does not know, ...)
    fails the test; transformers' own deprecation notices about the base model are let through."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def file_shapes(path) -> dict:
    return {k: v.shape for k, v in load_file(str(path)).items()}


def same_tensors(mine_dir, theirs_dir) -> None:
    mine = load_file(str(mine_dir / "adapter_model.safetensors"))
    theirs = load_file(str(theirs_dir / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert mine[k].shape == theirs[k].shape and np.array_equal(mine[k], theirs[k]), k


def merged_logits(out, ids) -> np.ndarray:
    merged, info = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    return torch_logits(merged.eval(), ids)
