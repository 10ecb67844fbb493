"""[export] PEFT round trips through the real `peft`, merged checkpoints through transformers, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxlora.cli.export import run_export
from jaxlora.cli.generate import run_generation
from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora, lora_scale, matching_paths, save_merged
from jaxlora.models import config_from_hf, load_model, load_tokenizer
from jaxlora.models.config import read_hf_config
from jaxlora.models.safetensors_io import SafetensorsFile
from jaxlora.peft import load_peft_adapter, save_peft_adapter
from jaxlora.quant import QuantizedTensor, make_quantizer
from tests.helpers.hf_tiny import FAMILIES
from tests.helpers.peft_torch import (
    file_shapes,
    hf_model,
    jax_logits,
    jl_config,
    peft_config,
    peft_warnings_are_errors,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("r8_qv", "r16_rslora_all")


# ----------------------------------------------------------------------------------------------------------
# jaxlora -> PEFT, PEFT -> jaxlora, merged -> transformers: every family, both settings


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_adapter_loads_in_peft(family, setting, base, tmp_path):
    folder, model = base(family)
    lc = jl_config(family, setting)
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    ids = token_ids(model.config.vocab_size)
    ours = jax_logits(model, ids, lora, lc)
    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(folder))

    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf_model(folder), str(out))
    check = pm.load_adapter(str(out), adapter_name="check")
    assert not check.unexpected_keys
    assert not [k for k in check.missing_keys if "lora_" in k and ".check." in k]
    # Same tensor names and shapes as PEFT itself saves for this model
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm, adapter_name="default").items()}
    assert file_shapes(out / "adapter_model.safetensors") == theirs
    conf = pm.peft_config["default"]
    assert (conf.r, conf.lora_alpha, conf.use_rslora) == (lc.r, lc.alpha, lc.use_rslora)
    assert conf.fan_in_fan_out == (family == "gpt2")

    diff = np.abs(torch_logits(pm, ids) - ours).max()
    print(f"{family} {setting}: jaxlora adapter in PEFT, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_made_adapter_imports(family, setting, base, tmp_path):
    folder, model = base(family)
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(folder), peft_config(family, setting))
    randomize_peft_(pm, 2)
    pm.eval()
    ids = token_ids(model.config.vocab_size)
    ref = torch_logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")

    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    want = jl_config(family, setting)
    assert (lc.r, lc.alpha, lc.use_rslora, lc.layers_to_transform) == (
        want.r,
        want.alpha,
        want.use_rslora,
        None,
    )
    diff = np.abs(jax_logits(model, ids, lora, lc) - ref).max()
    print(f"{family} {setting}: PEFT adapter in jaxlora, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4

    # Re-exported: PEFT's tensors (same names, shapes, values) and a config meaning the same
    again = save_peft_adapter(tmp_path / "again", lora, lc, model.config, str(folder))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_file(str(again / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert mine[k].shape == theirs[k].shape and np.array_equal(mine[k], theirs[k]), k
    c_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c_mine = json.loads((again / "adapter_config.json").read_text())
    assert set(c_mine) <= set(c_theirs), set(c_mine) - set(c_theirs)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias", "layers_to_transform"):
        assert c_mine[key] == c_theirs[key], key
    cfg = model.config
    assert matching_paths(cfg, c_mine["target_modules"]) == matching_paths(cfg, c_theirs["target_modules"])


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_in_transformers(family, setting, base, tmp_path):
    folder, model = base(family)
    lc = jl_config(family, setting)
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 3)
    ids = token_ids(model.config.vocab_size)
    ours = jax_logits(model, ids, lora, lc)
    out = save_merged(tmp_path / "merged", model, lora, lc)
    merged, info = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    diff = np.abs(torch_logits(merged.eval(), ids) - ours).max()
    print(f"{family} {setting}: merged checkpoint in transformers, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def test_merged_export_of_quantized_base_adds_to_dequantized_weights(base, tmp_path):
    folder, _ = base("qwen3")
    qmodel = load_model(folder, quantizer=make_quantizer("int8"))
    assert isinstance(qmodel.params["layers"]["attn"]["q_proj"]["kernel"], QuantizedTensor)
    lc = jl_config("qwen3", "r8_qv")
    lora = randomized(init_lora(qmodel.config, lc, jax.random.key(0)), 9)
    ids = token_ids(qmodel.config.vocab_size)
    ours = jax_logits(qmodel, ids, lora, lc)  # int8 base + adapter, as trained with QLoRA
    out = save_merged(tmp_path / "merged", qmodel, lora, lc, dtype="float32")
    merged, info = AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    diff = np.abs(torch_logits(merged.eval(), ids) - ours).max()
    print(
        f"int8 base merged checkpoint in transformers vs int8 base + adapter: max |logits diff| = {diff:.2e}"
    )
    assert diff < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layers_to_transform_round_trip(family, base, tmp_path):
    folder, model = base(family)
    ids = token_ids(model.config.vocab_size)
    # PEFT adapter on layer 1 only -> jaxlora
    pm = get_peft_model(hf_model(folder), peft_config(family, "r8_qv", layers_to_transform=[1]))
    randomize_peft_(pm, 4)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    assert lc.layers_to_transform == (1,)
    assert lora_scale(model.config, lc).tolist() == [0.0, 2.0]
    d_in = np.abs(jax_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, model.config, str(folder))
    assert sorted(file_shapes(again / "adapter_model.safetensors")) == sorted(
        file_shapes(tmp_path / "peft" / "adapter_model.safetensors")
    )
    assert all(".h.1." in k or ".layers.1." in k for k in file_shapes(again / "adapter_model.safetensors"))

    # jaxlora adapter on layer 0 only -> PEFT
    lc0 = jl_config(family, "r8_qv", layers_to_transform=[0])
    lora0 = randomized(init_lora(model.config, lc0, jax.random.key(0)), 5)
    out = save_peft_adapter(tmp_path / "mine", lora0, lc0, model.config, str(folder))
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [0]
    with peft_warnings_are_errors():
        pm0 = PeftModel.from_pretrained(hf_model(folder), str(out))
    d_out = np.abs(torch_logits(pm0, ids) - jax_logits(model, ids, lora0, lc0)).max()
    print(f"{family} layers_to_transform: PEFT -> jaxlora {d_in:.2e}, jaxlora -> PEFT {d_out:.2e}")
    assert d_in < 1e-4 and d_out < 1e-4


def test_gpt2_attn_c_proj_only_is_named_unambiguously(base, tmp_path):
    folder, model = base("gpt2")
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["attn.c_proj"])
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 8)
    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(folder))
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["attn.c_proj"]
    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf_model(folder), str(out))
    assert all(".attn.c_proj." in k for k in get_peft_model_state_dict(pm))  # not mlp.c_proj
    ids = token_ids(model.config.vocab_size)
    diff = np.abs(torch_logits(pm, ids) - jax_logits(model, ids, lora, lc)).max()
    print(f"gpt2 attn.c_proj only: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------------------
# The real stories260K model: generation with --adapter, merged export with the tokenizer


def test_stories_peft_adapter_generation_and_merged_tokenizer(stories_dir, tmp_path):
    # A PyTorch PEFT adapter on the real stories260K model, generated from with scripts/generate.py's code
    pm = get_peft_model(
        hf_model(stories_dir),
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    )
    randomize_peft_(pm, 6)
    pm.save_pretrained(tmp_path / "adapter")
    tok = load_tokenizer(stories_dir)
    prompt = "Once upon a time"
    with torch.no_grad():
        ref = pm.eval().generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    with_adapter = run_generation(str(stories_dir), [prompt], 12, adapter=str(tmp_path / "adapter"))
    print(f"jaxlora: {with_adapter[0]!r}\nPEFT:    {tok.decode(ref[0], skip_special_tokens=True)!r}")
    assert with_adapter[0] == tok.decode(ref[0], skip_special_tokens=True)

    model = load_model(stories_dir)
    lora, lc = load_peft_adapter(tmp_path / "adapter", model.config)
    out = save_merged(tmp_path / "merged", model, lora, lc, dtype="float32")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    text = "One day, a little girl"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok(text)["input_ids"]
    ids = np.asarray([tok(text)["input_ids"]], np.int32)
    diff = np.abs(torch_logits(hf_model(out), ids) - jax_logits(model, ids, lora, lc)).max()
    print(f"stories260K merged checkpoint in transformers, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    # bfloat16, sharded with an index as transformers writes big checkpoints
    bf16 = save_merged(tmp_path / "merged_bf16", model, lora, lc, dtype="bfloat16", max_shard_bytes=200_000)
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (bf16 / "model.safetensors").exists()
    assert {v["dtype"] for f in shards for v in SafetensorsFile(bf16 / f).header.values()} == {"BF16"}
    reloaded, info = AutoModelForCausalLM.from_pretrained(bf16, output_loading_info=True)
    assert not any(info.values()), info


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line each, from the library and from scripts/export.py


@pytest.fixture(scope="module")
def bad_adapters(base, tmp_path_factory):
    """name -> (adapter folder, model folder, expected message fragment) for the llama base."""
    folder, model = base("llama")
    root = tmp_path_factory.mktemp("bad")
    lc = jl_config("llama", "r8_qv")
    good = save_peft_adapter(
        root / "good", init_lora(model.config, lc, jax.random.key(0)), lc, model.config, "x"
    )
    mistral_folder, _ = base("mistral")

    def edited(name, **changes):
        d = root / name
        d.mkdir()
        conf = json.loads((good / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**conf, **changes}))
        (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        return d

    def peft_saved(name, config):
        pm = get_peft_model(hf_model(folder), config)
        pm.save_pretrained(root / name)
        return root / name

    no_weights = edited("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    ia3 = IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    dora_partial = PeftLoraConfig(
        r=4, target_modules=r".*layers\.0\.self_attn\.q_proj|.*v_proj", use_dora=True, task_type="CAUSAL_LM"
    )
    return {
        # llama's q_proj is 32 -> 48 (head_dim 12); mistral's is 32 -> 32
        "dims": (good, mistral_folder, "shape [48, 8] but this model needs [32, 8]"),
        "ia3": (peft_saved("ia3", ia3), folder, "peft_type is 'IA3'; only LORA adapters are supported"),
        "r0": (edited("r0", r=0), folder, "r must be a positive integer, got 0"),
        "targets": (edited("targets", target_modules=["query_key_value"]), folder, "matches no linear layer"),
        # DoRA is read (tests/test_peft_plus.py), but not on a module missing from some adapted layers
        "dora": (peft_saved("dora", dora_partial), folder, "DoRA modules ['attn.q_proj'] are adapted"),
        "bias": (peft_saved("bias", peft_config("llama", "r8_qv", bias="all")), folder, "bias 'all'"),
        "missing": (root / "nowhere", folder, "adapter folder not found"),
        "no_weights": (no_weights, folder, "no adapter_model.safetensors"),
    }


def model_config(folder):
    return config_from_hf(read_hf_config(folder))


def test_bad_adapters_one_line_each(bad_adapters, base):
    for name, (adapter, model_folder, fragment) in bad_adapters.items():
        with pytest.raises(UserError) as err:
            load_peft_adapter(adapter, model_config(model_folder))
        msg = str(err.value)
        print(f"{name}: {msg}")
        assert "\n" not in msg and fragment in msg, (name, msg)
        if name == "dims":
            assert "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in msg
        if name == "targets":
            assert (
                "its linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg
            )

    # never write into a non-empty folder unless asked
    folder, model = base("llama")
    good = bad_adapters["dims"][0]
    lc = jl_config("llama", "r8_qv")
    lora = init_lora(model.config, lc, jax.random.key(0))
    with pytest.raises(UserError, match=f"output folder {good} already exists and is not empty"):
        save_peft_adapter(good, lora, lc, model.config, "x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        save_merged(good, model, lora, lc)
    save_peft_adapter(good, lora, lc, model.config, "x", overwrite=True)
    with pytest.raises(UserError, match="no config.yaml; is this a jaxlora run folder"):
        run_export(None, str(folder), "peft", str(good), run=str(folder))


@pytest.mark.parametrize("case", ["dims", "ia3", "r0", "targets"])
def test_export_script_bad_input_exits_2(case, bad_adapters, tmp_path):
    adapter, model_folder, fragment = bad_adapters[case]
    cmd = [sys.executable, "scripts/export.py", "--adapter", str(adapter), "--model", str(model_folder)]
    proc = subprocess.run(
        cmd + ["--format", "peft", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_export_script_writes_peft_and_merged(fmt, base, tmp_path):
    folder, model = base("gpt2")
    pm = get_peft_model(hf_model(folder), peft_config("gpt2", "r16_rslora_all"))
    randomize_peft_(pm, 7)
    ids = token_ids(model.config.vocab_size)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["--adapter", str(tmp_path / "peft"), "--model", str(folder), "--format", fmt, "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "scripts/export.py", *args, "--overwrite"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    if fmt == "peft":
        with peft_warnings_are_errors():
            got = torch_logits(PeftModel.from_pretrained(hf_model(folder), str(out)), ids)
    else:
        got = torch_logits(hf_model(out), ids)
    diff = np.abs(got - ref).max()
    print(f"scripts/export.py --format {fmt}: max |logits diff| vs the PEFT model = {diff:.2e}")
    assert diff < 1e-4
