"""[quant] the stories260K Alpaca fine-tune on an int8 and an NF4 base: loss falls, adapter loads in PEFT."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.config import config_from_dict
from jaxlora.lora import lora_scale
from jaxlora.models import forward, load_model
from jaxlora.peft import load_peft_adapter
from jaxlora.train import train
from tests.helpers.recipes import run_config


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_quantized_base_finetune(weights, assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = run_config(
        assets,
        out,
        **{
            "train.max_steps": 40,
            "train.eval_every_steps": 40,
            "train.eval_batches": 4,
            "checkpoint.every_steps": None,
            "quant.weights": weights,
        },
    )
    result = train(config_from_dict(cfg))
    before, after = result.eval_history[0][1], result.eval_history[-1][1]
    print(f"{weights} base: eval loss {before:.4f} -> {after:.4f} ({after / before:.3f}x)")
    assert after <= 0.8 * before

    stories = assets / "models" / "stories260K"
    base = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns of missing or unexpected keys
        peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = np.array([[1, 403, 407, 261, 378, 432, 383, 286]])
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    model = load_model(stories)
    lora, lcfg = load_peft_adapter(out / "adapter", model.config)
    ours = forward(
        model.params,
        model.config,
        jnp.asarray(ids),
        lora=lora,
        lora_scale=jnp.asarray(lora_scale(model.config, lcfg)),
    )
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"{weights}: adapter in PEFT vs jaxlora on the float base, max logits diff {diff:.2e}")
    assert diff < 1e-4


def test_unknown_quant_weights_is_one_line(assets, tmp_path):
    from jaxlora.errors import UserError

    cfg = run_config(assets, tmp_path / "run", **{"quant.weights": "int4"})
    with pytest.raises(UserError, match="none, int8, nf4") as err:
        config_from_dict(cfg)
    assert "\n" not in str(err.value)
