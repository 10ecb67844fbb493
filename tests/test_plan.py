"""[memory] `jaxlora plan`: the parameter counts against transformers and PEFT for every family, from a
folder holding only config.json; the JSON report and the command's errors; `--max-seq-len`; the abstract
quantized kernels against `quantize`; `train.preflight` and the start summary's peak.

The counts need no compilation (`compile_step_too=False`); the few compiled plans use one- or two-layer
configs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from jaxlora.cli.main import run as jaxlora_cli
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.quant import quantize
from jaxlora.quant.abstract import abstract_quantize
from jaxlora.train import train
from jaxlora.train.memory_plan import Planner, longest_seq_len, plan_memory
from tests.helpers.hf_tiny import FAMILIES, MOE_FAMILIES, NEW_FAMILIES, hf_config, make_hf_gemma3
from tests.helpers.recipes import set_dotted, tiny_config

ROOT = Path(__file__).resolve().parents[1]
EVERY_FAMILY = (*FAMILIES, *NEW_FAMILIES, *MOE_FAMILIES)
NAMED = {"gpt2": ["c_attn"], "phi3": ["qkv_proj"]}  # else q_proj and v_proj
MOE_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config_only(folder: Path, family: str, **overrides):
    """Write the tiny config.json of `family` (nothing else) into `folder`; return a fresh transformers
    model built from it (random weights, never saved)."""
    config = hf_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return AutoModelForCausalLM.from_config(config)


def _run_config(folder: Path, **over) -> dict:
    """A run config on the model in `folder`: all-linear r 8, batch 2 of 16 tokens, data that never exists."""
    raw = {
        "output_dir": str(folder / "run"),
        "model": {"path": str(folder)},
        "data": {"train": [{"path": str(folder / "none.jsonl"), "format": "alpaca"}], "seq_len": 16},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"batch_size": 2},
    }
    return set_dotted(raw, over)


def _counts(folder: Path, **over) -> dict:
    return plan_memory(config_from_dict(_run_config(folder, **over)), compile_step_too=False)["params"]


def _peft_trainable(model, family: str, **kw) -> int:
    kw.setdefault("fan_in_fan_out", family == "gpt2")
    peft = get_peft_model(model, PeftLoraConfig(task_type="CAUSAL_LM", **kw))
    return peft.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("targets", ["all-linear", "named"])
@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_counts_equal_transformers_and_peft(family, targets, tmp_path):
    model = _config_only(tmp_path / "model", family)
    modules = "all-linear" if targets == "all-linear" else NAMED.get(family, ["q_proj", "v_proj"])
    r = 8 if targets == "all-linear" else 4
    got = _counts(tmp_path / "model", **{"lora.target_modules": modules, "lora.r": r, "lora.alpha": 2 * r})
    assert got["total"] == model.num_parameters()  # tied weights once
    assert got["trainable"] == _peft_trainable(model, family, r=r, lora_alpha=2 * r, target_modules=modules)


# (family, jaxlora lora.* keys, PEFT LoraConfig keys): the options that change PEFT's count
OPTIONS = {
    "dora": ("llama", {"use_dora": True}, {"use_dora": True}),
    "lora_bias": ("llama", {"lora_bias": True}, {"lora_bias": True}),
    "rank and alpha patterns": (
        "llama",
        {"rank_pattern": {"layers.1.self_attn.q_proj": 2, "o_proj": 3}, "alpha_pattern": {"o_proj": 5}},
        {"rank_pattern": {"layers.1.self_attn.q_proj": 2, "o_proj": 3}, "alpha_pattern": {"o_proj": 5}},
    ),
    "layers_to_transform": (
        "qwen3",
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    ),
    "trainable tokens": ("llama", {"trainable_token_indices": [3, 7]}, {"trainable_token_indices": [3, 7]}),
    "trainable tokens, tied": (
        "llama_tied_mqa",
        {"trainable_token_indices": [3, 7, 9]},
        {"trainable_token_indices": [3, 7, 9]},
    ),
    "modules_to_save": (
        "llama",
        {"modules_to_save": ["embed_tokens", "lm_head"]},
        {"modules_to_save": ["embed_tokens", "lm_head"]},
    ),
    "modules_to_save, tied": (
        "qwen2",
        {"modules_to_save": ["embed_tokens", "lm_head"]},
        {"modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True},
    ),
    "experts": (
        "qwen3_moe",
        {"target_modules": ["q_proj"], "target_parameters": MOE_TARGETS},
        {"target_modules": ["q_proj"], "target_parameters": MOE_TARGETS},
    ),
    "router and experts, patterns": (
        "mixtral",
        {"target_modules": ["o_proj"], "target_parameters": ["mlp.gate.weight", *MOE_TARGETS],
         "rank_pattern": {"down_proj": 2}},
        {"target_modules": ["o_proj"], "target_parameters": ["mlp.gate.weight", *MOE_TARGETS],
         "rank_pattern": {"down_proj": 2}},
    ),
}  # fmt: skip


@pytest.mark.parametrize("option", OPTIONS)
def test_trainable_equals_peft_with_every_option(option, tmp_path):
    family, ours, theirs = OPTIONS[option]
    model = _config_only(tmp_path / "model", family)
    got = _counts(tmp_path / "model", **{f"lora.{k}": v for k, v in ours.items()})
    theirs = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **theirs}
    assert got["trainable"] == _peft_trainable(model, family, **theirs)


def test_a_multimodal_checkpoint_counts_its_text_tower(tmp_path):
    """gemma3 (text and vision): jaxlora trains the text tower, whose weights the plan counts."""
    model = make_hf_gemma3(tmp_path / "model")
    text = model.model.language_model
    tied = model.lm_head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()
    tower = text.num_parameters() + (0 if tied else model.lm_head.weight.numel())
    assert _counts(tmp_path / "model")["total"] == tower


def test_json_report_from_a_folder_holding_only_config_json(tmp_path, capsys):
    _config_only(tmp_path / "model", "llama")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path / "model", **{"quant.weights": "int8"})))
    assert jaxlora_cli(["plan", "--config", str(path), "data.seq_len=32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mem = report["memory"]
    for key in ("weights", "trainable", "optimizer", "activations", "peak"):
        assert isinstance(mem[key], int) and mem[key] > 0, key
    assert mem["backend"] == jax.default_backend() and isinstance(report["fits"], bool)
    assert report["params"]["total"] > report["params"]["trainable"] > 0
    assert mem["peak"] == mem["arguments"] + mem["activations"] + mem["outputs"] - mem["aliased"]
    assert mem["arguments"] >= mem["weights"] + mem["trainable"] + mem["optimizer"]
    assert set(mem["weights_by_kind"]) == {"int8", "float32"} and report["run"]["seq_len"] == 32
    if mem["backend"] == "cpu":
        assert any("XLA:CPU" in n for n in report["notes"])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]  # nothing else read


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "model").mkdir()  # no config.json
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path / "model")))
    done = subprocess.run(
        [sys.executable, "scripts/plan.py", "--config", str(path), "--no-compile"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "no config.json found" in lines[0], done.stderr
    with pytest.raises(UserError, match="train.nope"):
        jaxlora_cli(["plan", "--config", str(path), "train.nope=1"])


def test_max_seq_len_fits_and_its_double_does_not(tmp_path):
    _config_only(tmp_path / "model", "llama", max_position_embeddings=2048, num_hidden_layers=1)
    cfg = config_from_dict(_run_config(tmp_path / "model", **{"data.seq_len": 128}))
    p = Planner(cfg)
    low, high = (p.report(n)["memory"]["peak"] for n in (128, 256))
    assert low < high
    p.capacity = (low + high) // 2  # 128 fits, 256 does not
    report = longest_seq_len(cfg, planner=p)
    n = report["max_seq_len"]
    assert 128 <= n < 256 and report["fits"] and report["run"]["seq_len"] == n
    assert not p.report(2 * n)["fits"]


@pytest.mark.parametrize(
    ("lead", "kernel", "method", "block"),
    [((2,), (24, 8), "int8", None), ((2, 3), (24, 8), "int8", 8), ((1,), (72, 8), "nf4", None),
     ((2,), (32, 40), "nf4", 16), ((), (24, 8), "nf4", None)],
)  # fmt: skip
def test_abstract_quantize_has_the_shapes_of_quantize(lead, kernel, method, block):
    real = quantize(np.ones((*lead, *kernel), np.float32), method, block)
    abstract = abstract_quantize(lead, kernel, method, block)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)  # static fields included
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
        assert (r.shape, np.dtype(r.dtype)) == (a.shape, a.dtype)
    with pytest.raises(UserError) as theirs:
        quantize(np.ones((10, 4), np.float32), method, 3)
    with pytest.raises(UserError) as ours:
        abstract_quantize((), (10, 4), method, 3)
    assert str(ours.value) == str(theirs.value)


def test_preflight_refuses_a_run_that_cannot_fit_in_one_line(tmp_path):
    """A 1.3 TiB model (config.json only: no weights, no tokenizer, no data) is refused before anything
    else is read, and output_dir is not created."""
    folder = tmp_path / "huge"
    _write_huge_config(folder)
    cfg = config_from_dict(
        _run_config(folder, **{"train.preflight": True, "lora.target_modules": ["q_proj"]})
    )
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("train.preflight: the plan's peak is") and "\n" not in message
    assert not (folder / "run").exists()


def _write_huge_config(folder: Path) -> None:
    folder.mkdir()
    hf = {"model_type": "llama", "vocab_size": 1 << 20, "hidden_size": 1 << 17, "intermediate_size": 1 << 17,
          "num_hidden_layers": 1, "num_attention_heads": 1024, "num_key_value_heads": 8, "head_dim": 128,
          "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hf))


def test_preflight_run_starts_and_prints_the_peak(assets, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(assets, out, **{"train.max_steps": 1, "train.preflight": True})
    train(config_from_dict(cfg))
    printed = capsys.readouterr().out
    assert "memory plan: peak" in printed and "per device = arguments" in printed, printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
