"""Checks that tests/test_families.py and tests/test_moe.py run on each tiny checkpoint: KV-cache generation
against a full recompute, a jaxlora adapter in real PEFT, a merged export in real transformers."""

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from peft import PeftModel
from transformers import AutoModelForCausalLM

from jaxlora.lora import save_merged
from jaxlora.models import forward
from jaxlora.models.generate import generate, left_pad
from jaxlora.peft import save_peft_adapter
from tests.helpers.peft_torch import hf_model, jax_logits, peft_warnings_are_errors, torch_logits


def kv_cache_gap(model, prompts: list[list[int]], steps: int) -> float:
    """Max |logits| difference between `steps` sampled tokens with the KV cache and one full forward over
    prompt + new tokens."""
    new, step_logits = generate(
        model.params, model.config, prompts, steps, temperature=1.0, seed=3, eos_ids=(), return_logits=True
    )
    # With left padding every row ends at the same index, so the logits after prompt + new[:n] sit at
    # T - steps + n - 1 in every row.
    ids, mask = left_pad([p + row for p, row in zip(prompts, new, strict=True)])
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(
        forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    )
    t = ids.shape[1]
    return max(float(np.abs(full[:, t - steps + n - 1] - step_logits[:, n]).max()) for n in range(steps))


def peft_export_gap(model, folder: Path, lora, lc, ids, out: Path, pattern_notice: bool = False):
    """Save `lora` as a PEFT adapter at `out` for the checkpoint `folder` and load it in PEFT (no warning,
    no adapter key missing or unexpected); return (max |logits diff| on `ids`, the adapter folder).
    `pattern_notice`: let PEFT's rank/alpha_pattern notice through (it draws it on its own MoE adapters)."""
    ours = jax_logits(model, ids, lora, lc)
    out = save_peft_adapter(out, lora, lc, model.config, str(folder))
    with peft_warnings_are_errors():
        if pattern_notice:
            warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys", RuntimeWarning)
        pm = PeftModel.from_pretrained(hf_model(folder), str(out))
    check = pm.load_adapter(str(out), adapter_name="check")
    assert not check.unexpected_keys
    assert not [k for k in check.missing_keys if "lora_" in k and ".check." in k]
    return np.abs(torch_logits(pm, ids) - ours).max(), out


def merged_export_gap(model, lora, lc, ids, out: Path) -> float:
    """Save the merged model at `out`, load it in transformers (nothing missing, unexpected or mismatched)
    and return the max |logits diff| against jaxlora with the adapter on `ids`."""
    ours = jax_logits(model, ids, lora, lc)
    out = save_merged(out, model, lora, lc)
    merged, info = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    return np.abs(torch_logits(merged.eval(), ids) - ours).max()
