"""[frontier] Multimodal checkpoints both ways: the text tower jaxlora trains, exported as a PEFT adapter
of the whole `*ForConditionalGeneration` model and as a merged checkpoint of that class (other towers
copied through byte for byte), and PEFT adapters made on the whole model in PyTorch read back."""

import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from jaxlora.cli.export import run_export
from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models.checkpoint_names import is_text_tower, other_tower_names
from jaxlora.models.safetensors_io import CheckpointReader
from jaxlora.models.targets import linear_modules
from jaxlora.peft import load_peft_adapter, save_peft_adapter
from tests.helpers.hf_multimodal import BUILDERS, hf_class, load_hf, multimodal_cache, text_logits
from tests.helpers.peft_torch import (
    file_shapes,
    jax_logits,
    peft_warnings_are_errors,
    randomize_peft_,
    randomized,
    token_ids,
)

TYPES = tuple(BUILDERS)
# what a PyTorch user targets on the whole model: the language model's linears, not the vision tower's
TEXT_ONLY = r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)"


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return multimodal_cache(tmp_path_factory)


def _lora_modules(pm) -> list[str]:
    return [n for n, _ in pm.named_modules() if n.endswith(".lora_A")]


@pytest.mark.parametrize("model_type", TYPES)
def test_text_tower_adapter_loads_onto_the_whole_model(model_type, mm, tmp_path):
    folder, model = mm(model_type)
    lc = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear", layers_to_transform=[0, 2])
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    ids = token_ids(model.config.vocab_size)
    ours = jax_logits(model, ids, lora, lc)
    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(folder))

    with peft_warnings_are_errors():  # "Found missing adapter keys" and the like fail here
        pm = PeftModel.from_pretrained(load_hf(folder), str(out))
    assert type(pm.base_model.model) is hf_class(folder)
    check = pm.load_adapter(str(out), adapter_name="check")
    assert not check.unexpected_keys
    assert not [k for k in check.missing_keys if "lora_" in k and ".check." in k]
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm, adapter_name="default").items()}
    assert file_shapes(out / "adapter_model.safetensors") == theirs
    wrapped = _lora_modules(pm)  # the text tower's linears of layers 0 and 2, nothing of the vision tower
    assert wrapped and all(".language_model.layers." in n for n in wrapped)
    assert {n.split(".layers.")[1].split(".")[0] for n in wrapped} == {"0", "2"}
    # every linear of layers 0 and 2 (Gemma 3: q, k, v, o, gate, up, down; Qwen3.5: its layer's mixer's)
    assert len(wrapped) == sum(i in m.layers for m in linear_modules(model.config) for i in (0, 2))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(conf["target_modules"], str) and conf["layers_to_transform"] is None

    diff = float(np.abs(text_logits(pm, ids) - ours).max())
    print(f"{model_type}: jaxlora adapter in PEFT on the whole model, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    # read back: the same tree
    again, lc2 = load_peft_adapter(out, model.config)
    assert lc2.layers_to_transform == (0, 2)
    assert np.abs(jax_logits(model, ids, again, lc2) - ours).max() < 1e-5


def _torch_adapter(folder, path, targets, seed: int):
    """A PEFT adapter made in PyTorch on the whole multimodal model: (the PEFT model, its folder)."""
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(folder), PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_peft_(pm, seed)
    pm.eval()
    pm.save_pretrained(path)
    return pm, path


@pytest.mark.parametrize("model_type", TYPES)
def test_peft_made_adapter_imports_and_vision_adapters_are_refused(model_type, mm, tmp_path):
    folder, model = mm(model_type)
    pm, path = _torch_adapter(folder, tmp_path / "peft", TEXT_ONLY, 2)
    ids = token_ids(model.config.vocab_size)
    ref = text_logits(pm, ids)
    lora, lc = load_peft_adapter(path, model.config)
    diff = float(np.abs(jax_logits(model, ids, lora, lc) - ref).max())
    print(f"{model_type}: PEFT adapter of the whole model in jaxlora, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    # re-exported: PEFT's own tensors, names and values
    again = save_peft_adapter(tmp_path / "again", lora, lc, model.config, str(folder))
    theirs = load_file(str(path / "adapter_model.safetensors"))
    mine = load_file(str(again / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    assert all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    # transformers 4's names (language_model.model.layers...) read the same
    old = tmp_path / "v4"
    old.mkdir()
    (old / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    v4 = {k.replace("model.language_model.", "language_model.model."): v for k, v in theirs.items()}
    save_file(v4, str(old / "adapter_model.safetensors"))
    same, lc4 = load_peft_adapter(old, model.config)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), same, lora)) and lc4 == lc
    # PEFT's all-linear on the whole model adapts the vision tower too: refused in one line
    _, bad = _torch_adapter(folder, tmp_path / "all_linear", "all-linear", 3)
    with pytest.raises(UserError, match="outside the text tower") as err:
        load_peft_adapter(bad, model.config)
    tensor = str(err.value).split(" tensor ")[1].split()[0]  # the tensor named: another tower's
    assert "\n" not in str(err.value) and other_tower_names([tensor.removeprefix("base_model.model.")])


@pytest.mark.parametrize("model_type", TYPES)
def test_merged_export_is_the_same_class_with_other_towers_copied(model_type, mm, tmp_path):
    folder, model = mm(model_type)
    pm, path = _torch_adapter(folder, tmp_path / "peft", TEXT_ONLY, 4)
    ids = token_ids(model.config.vocab_size)
    ref = text_logits(pm.merge_and_unload(), ids)
    out = run_export(str(path), str(folder), "merged", str(tmp_path / "merged"))

    merged = load_hf(out)  # no missing, unexpected or mismatched tensors
    assert type(merged) is hf_class(folder)
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    diff = float(np.abs(text_logits(merged, ids) - ref).max())
    print(f"{model_type}: merged export vs PEFT's merge_and_unload, max |text logits diff| = {diff:.2e}")
    assert diff < 1e-4
    src, dst = CheckpointReader(folder), CheckpointReader(out)
    others = other_tower_names(src.names())
    assert others and sorted(other_tower_names(dst.names())) == sorted(others)
    for name in others:  # vision tower and projector: byte for byte
        a, b = src.get(name), dst.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert sorted(dst.names()) == sorted(src.names())  # the text tower under the source's names
    changed = [n for n in src.names() if src.get(n).tobytes() != dst.get(n).tobytes()]
    assert changed and all(is_text_tower(n) for n in changed)  # language_model.* or model.language_model.*
