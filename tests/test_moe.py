"""[moe] Mixtral, Qwen3-MoE and Qwen2-MoE against transformers and PEFT: logits, aux loss, KV cache, both
checkpoint layouts, PEFT adapters on attention, router, experts and Qwen2-MoE's shared expert, merged
export, int8/NF4 experts, expert mesh.

One tiny random checkpoint per family (tests/helpers/hf_tiny.py: 8 experts, top-2, saved with
`save_pretrained`, which writes the hub's per-expert layout) is built once per module and serves every
check; one 4-device subprocess (tests/helpers/parallel_driver.py) trains on one device, on expert=4 and
on fsdp=2 x expert=2.
"""

import dataclasses
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models import forward, load_model
from jaxlora.models.config import config_from_hf
from jaxlora.models.targets import linear_modules
from jaxlora.peft import load_peft_adapter, save_peft_adapter
from jaxlora.quant import QuantizedTensor, dequantize, make_quantizer
from jaxlora.train.flops import train_step_flops
from tests.helpers.family_checks import kv_cache_gap, merged_export_gap, peft_export_gap
from tests.helpers.hf_tiny import MOE_FAMILIES, copy_tokenizer, hf_forward, model_cache, padded_batch
from tests.helpers.parallel_driver import MOE_TARGETS, moe_losses
from tests.helpers.parallel_runs import _drive
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    peft_warnings_are_errors,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

# (target_modules, target_parameters) for jaxlora and PEFT alike
SETTINGS = {
    "attention": (["q_proj", "k_proj", "v_proj", "o_proj"], None),
    "experts": (["q_proj", "v_proj"], list(MOE_TARGETS)),
    "router+down": (["o_proj"], ["mlp.gate.weight", "mlp.experts.down_proj"]),
    # PEFT converts these to target_parameters itself: router and experts, gate_up_proj at rank 2r
    # (not on qwen2_moe: there all-linear is attention and the shared expert with its gate, as in PEFT 0.21)
    "all-linear": ("all-linear", None),
    "all-linear+experts": ("all-linear", ["mlp.gate.weight", *MOE_TARGETS]),
}
# transformers 4 expert names, which PEFT converts (jaxlora the same way): gate_up_proj at rank 2r
V4_NAMES = {"mixtral": ["w1", "w3", "w2"], "qwen3_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (folder, torch model, jaxlora Model), each built once."""
    return model_cache(tmp_path_factory)


def _targets(family: str, setting: str):
    return (V4_NAMES[family], None) if setting == "v4 names" else SETTINGS[setting]


def _lora_config(family: str, setting: str) -> LoraConfig:
    modules, params = _targets(family, setting)
    modules = modules if isinstance(modules, str) else tuple(modules)
    return LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=modules, target_parameters=params)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_and_aux_loss_match_transformers_on_a_padded_batch(family, impl, built):
    _, hf, model = built(family)
    cfg = model.config.with_runtime(moe_impl=impl)
    ids, mask, pos = padded_batch(cfg.vocab_size, 12)
    ref = hf_forward(hf, ids, mask, pos, output_router_logits=True)
    ours, aux = forward(
        model.params, cfg, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask), return_aux_loss=True
    )
    diff = float(np.abs(np.asarray(ours) - ref.logits.numpy())[mask == 1].max())
    aux_diff = abs(float(aux) - float(ref.aux_loss))
    print(
        f"{family} {impl}: logits diff {diff:.2e}; aux loss {float(aux):.6f} vs HF {float(ref.aux_loss):.6f}"
    )
    assert diff < 1e-4
    assert aux_diff < 1e-5 and float(aux) > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kv_cache_generation_equals_recompute(family, built):
    _, _, model = built(family)
    worst = kv_cache_gap(model, [[1, 5, 9, 33, 40, 7, 11], [1, 60], [1, 22, 17, 4]], 8)
    print(f"{family}: KV cache vs recompute, max logits diff {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_layout_loads_to_the_same_params(family, built, tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2F, D] gate_up_proj, [E, D, F] down_proj, and
    Mixtral's router as mlp.gate); a checkpoint of that state dict loads like the per-expert one."""
    folder, hf, model = built(family)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(folder / "config.json", tmp_path / "config.json")
    fused = load_model(tmp_path)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(fused.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("family", "setting"),
    [
        ("mixtral", "attention"),
        ("mixtral", "experts"),
        ("mixtral", "router+down"),
        ("mixtral", "all-linear"),
        ("qwen3_moe", "all-linear"),
        ("qwen3_moe", "v4 names"),
        ("qwen2_moe", "all-linear+experts"),
    ],
)
def test_peft_round_trips(family, setting, built, tmp_path):
    folder, _, model = built(family)
    lc = _lora_config(family, setting)
    ids = token_ids(model.config.vocab_size)
    # jaxlora -> PEFT, both expert implementations
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    ours = jax_logits(model, ids, lora, lc)
    ragged = dataclasses.replace(model, config=model.config.with_runtime(moe_impl="ragged"))
    assert np.abs(jax_logits(ragged, ids, lora, lc) - ours).max() < 1e-5
    # PEFT checks rank/alpha patterns against target_modules only, so the gate_up_proj pattern it writes
    # itself (rank 2r) draws a notice on loading its own adapters too; it is applied.
    exported, out = peft_export_gap(model, folder, lora, lc, ids, tmp_path / "adapter", pattern_notice=True)
    # PEFT -> jaxlora
    modules, params = _targets(family, setting)
    torch.manual_seed(0)
    peft_cfg = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=modules, target_parameters=params, task_type="CAUSAL_LM"
    )
    made = get_peft_model(hf_model(folder), peft_cfg)
    randomize_peft_(made, 2)
    ref = torch_logits(made.eval(), ids)
    made.save_pretrained(tmp_path / "peft")
    back, back_cfg = load_peft_adapter(tmp_path / "peft", model.config)
    imported = np.abs(jax_logits(model, ids, back, back_cfg) - ref).max()
    print(f"{family} {setting}: exported to PEFT {exported:.2e}, imported from PEFT {imported:.2e}")
    assert exported < 1e-4 and imported < 1e-4
    # the same modules and parameters adapted, under the same tensor names
    assert _tensor_names(out) == _tensor_names(tmp_path / "peft")
    if setting != "attention":
        wrote = json.loads((out / "adapter_config.json").read_text())
        peft_wrote = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert sorted(wrote["target_parameters"]) == sorted(back_cfg.target_parameters)
        assert len(wrote["target_parameters"]) == len(peft_wrote["target_parameters"])
        assert wrote["rank_pattern"] == peft_wrote["rank_pattern"], (wrote["rank_pattern"], peft_wrote)


def _tensor_names(folder) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merged_export_loads_in_transformers(family, built, tmp_path):
    _, _, model = built(family)
    lc = _lora_config(family, "all-linear+experts" if family == "qwen2_moe" else "all-linear")
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 3)
    diff = merged_export_gap(model, lora, lc, token_ids(model.config.vocab_size), tmp_path / "merged")
    print(f"{family}: merged checkpoint in transformers, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_experts_load_and_fine_tune(kind, built):
    folder, _, model = built("qwen3_moe")
    q = load_model(folder, quantizer=make_quantizer(kind))
    moe = q.params["layers"]["moe"]
    assert isinstance(moe["gate_up_proj"]["kernel"], QuantizedTensor)
    assert isinstance(moe["down_proj"]["kernel"], QuantizedTensor)
    assert not isinstance(moe["router"]["kernel"], QuantizedTensor)  # routing stays in float
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    deq = jax.tree.map(
        lambda x: jnp.asarray(dequantize(x, np.float32)) if isinstance(x, QuantizedTensor) else x,
        q.params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    exact = float(jnp.abs(forward(deq, q.config, ids) - forward(q.params, q.config, ids)).max())
    assert exact < 1e-4
    losses = moe_losses(folder, 20, quant=kind)
    print(f"qwen3_moe {kind}: train losses", [round(x, 3) for x in losses])
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_expert_mesh_equals_one_device(built, tmp_path):
    folder = str(built("mixtral")[0])
    runs = [
        {"name": "one", "moe": folder, "steps": 10},
        {"name": "e4 ragged", "moe": folder, "steps": 10, "mesh": {"expert": 4}, "impl": "ragged"},
        {"name": "f2e2 dense", "moe": folder, "steps": 10, "mesh": {"fsdp": 2, "expert": 2}, "impl": "dense"},
    ]
    got = _drive(runs, 4, tmp_path / "runs.json")
    one = got["one"]["losses"]
    assert sorted(one) == list(range(1, 11)) and one[10] < one[1]
    for name in ("e4 ragged", "f2e2 dense"):
        diff = max(abs(one[s] - got[name]["losses"][s]) for s in range(1, 11))
        print(f"mixtral {name} vs one device: max loss diff {diff:.2e}")
        assert diff < 1e-4


def test_what_peft_cannot_express_is_refused(built):
    cfg = built("mixtral")[2].config
    key = jax.random.key(0)
    with pytest.raises(UserError, match="lora.dropout > 0") as err:
        init_lora(
            cfg, LoraConfig(r=4, dropout=0.1, target_modules=("q_proj",), target_parameters=MOE_TARGETS), key
        )
    assert "\n" not in str(err.value) and "PEFT" in str(err.value)
    with pytest.raises(UserError, match="lora.use_dora"):
        init_lora(
            cfg,
            LoraConfig(
                r=4, dropout=0.0, use_dora=True, target_modules=("q_proj",), target_parameters=MOE_TARGETS
            ),
            key,
        )
    with pytest.raises(UserError, match="names no weight"):
        init_lora(
            cfg, LoraConfig(r=4, dropout=0.0, target_modules=("q_proj",), target_parameters=("w1",)), key
        )
    with pytest.raises(UserError, match="w1 without w3") as err:  # PEFT refuses it too
        init_lora(cfg, LoraConfig(r=4, dropout=0.0, target_modules=("q_proj", "w1")), key)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="target_parameters"):  # no such linear module: the hint
        init_lora(cfg, LoraConfig(r=4, dropout=0.0, target_modules=("gate_proj",)), key)


def test_qwen2_moe_target_selection_matches_peft(built):
    """PEFT 0.21 converts no transformers 4 names on qwen2_moe: `all-linear` is attention plus the shared
    expert and its gate (no router, no experts), and `gate_proj`/`up_proj`/`down_proj` name the shared expert
    only. jaxlora adapts the same modules in every layer."""
    folder, _, model = built("qwen2_moe")
    cfg = model.config
    mods = linear_modules(cfg)
    for targets in ("all-linear", ["gate_proj", "up_proj", "down_proj"], ["shared_expert_gate", "o_proj"]):
        made = get_peft_model(hf_model(folder), PeftLoraConfig(r=2, target_modules=targets))
        assert not made.peft_config["default"].target_parameters
        theirs = {
            n.removeprefix("base_model.model.").removesuffix(".lora_A")
            for n, _ in made.named_modules()
            if n.endswith(".lora_A")
        }
        modules = targets if isinstance(targets, str) else tuple(targets)
        tree = init_lora(cfg, LoraConfig(r=2, dropout=0.0, target_modules=modules), jax.random.key(0))
        assert "moe" not in tree
        ours = {m.hf_prefix.format(i=i) for m in mods if m.key[1] in tree.get(m.key[0], {}) for i in (0, 1)}
        assert ours == theirs, (targets, sorted(ours ^ theirs))
    assert "model.layers.1.mlp.shared_expert_gate" in ours


def test_qwen2_moe_quantized_shared_expert(built):
    """NF4 quantizes the shared expert's linears like the experts; the router and the shared expert's gate
    stay in float."""
    folder, _, model = built("qwen2_moe")
    q = load_model(folder, quantizer=make_quantizer("nf4"))
    layers = q.params["layers"]
    for group, name in [("shared_expert", "gate_proj"), ("shared_expert", "down_proj"), ("moe", "down_proj")]:
        assert isinstance(layers[group][name]["kernel"], QuantizedTensor), (group, name)
    for group in ("shared_expert", "moe"):
        assert not isinstance(layers[group]["router"]["kernel"], QuantizedTensor)
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    deq = jax.tree.map(
        lambda x: jnp.asarray(dequantize(x, np.float32)) if isinstance(x, QuantizedTensor) else x,
        q.params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    assert float(jnp.abs(forward(deq, q.config, ids) - forward(q.params, q.config, ids)).max()) < 1e-4


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_qwen2_moe_dense_layers_are_refused(dense, built):
    hf = json.loads((built("qwen2_moe")[0] / "config.json").read_text())
    with pytest.raises(UserError, match="dense layers") as err:
        config_from_hf({**hf, **dense})
    assert "\n" not in str(err.value)


def test_rank_and_alpha_patterns_on_experts_match_peft(built, tmp_path):
    folder, _, model = built("qwen3_moe")
    lc = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=("q_proj",),
        target_parameters=MOE_TARGETS,
        rank_pattern={"gate_up_proj": 6},
        alpha_pattern={r".*\.down_proj": 20.0},
    )
    lora = init_lora(model.config, lc, jax.random.key(0))
    ab = {"a", "b"}
    lora = jax.tree_util.tree_map_with_path(  # random A and B; the "s" scale factors kept
        lambda p, x: randomized(x, 4) if p[-1].key in ab else x, lora
    )
    assert lora["moe"]["gate_up_proj"]["a"].shape[-1] == 6
    ids = token_ids(model.config.vocab_size)
    ours = jax_logits(model, ids, lora, lc)
    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(folder))
    with peft_warnings_are_errors():
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys", RuntimeWarning)
        pm = PeftModel.from_pretrained(hf_model(folder), str(out))
    back, back_cfg = load_peft_adapter(out, model.config)
    exported = np.abs(torch_logits(pm, ids) - ours).max()
    reimported = np.abs(jax_logits(model, ids, back, back_cfg) - ours).max()
    print(f"qwen3_moe expert rank/alpha patterns: PEFT {exported:.2e}, re-imported {reimported:.2e}")
    assert exported < 1e-4 and reimported < 1e-5


def test_flops_count_active_experts_only(built):
    cfg = built("mixtral")[2].config  # D 32, E 8, k 2, F 48, attention 32 -> 32/16/16/32
    d, e, k, f = cfg.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size
    attn = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    got = train_step_flops(cfg, r=2, targets=[("moe", "down_proj")], batch=1, seq_len=4)
    tokens = 4
    assert got["frozen"] == 4 * (attn + d * e + k * 3 * d * f) * cfg.num_layers * tokens
    assert got["adapters"] == 6 * k * 2 * (f + d) * cfg.num_layers * tokens  # k experts per token


def test_training_run_with_expert_lora_and_aux_loss(built, stories_dir, assets, tmp_path):
    """The run config end to end on Mixtral: expert LoRA through `lora.target_parameters`, the load-balancing
    loss through `train.moe_aux_loss` (logged as train/aux_loss), and the run's adapter/ in real PEFT."""
    from pathlib import Path

    from jaxlora.config import load_config
    from jaxlora.train import train
    from jaxlora.train.checkpoint import restore_lora

    folder, _, model = built("mixtral")
    copy_tokenizer(stories_dir, folder)
    out = tmp_path / "run"
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "stories260k-alpaca.yaml",
        [
            f"output_dir={out}",
            f"model.path={folder}",
            f"data.train[0].path={assets / 'data' / 'alpaca_cleaned_1000.json'}",
            "lora.r=4",
            "lora.dropout=0.0",
            "lora.target_modules=[q_proj,v_proj]",
            f"lora.target_parameters=[{','.join(MOE_TARGETS)}]",
            "data.seq_len=128",
            "train.batch_size=4",
            "train.max_steps=6",
            "train.learning_rate=1e-2",
            "train.moe_aux_loss=true",
            "train.eval_every_steps=null",
            "logging.every_steps=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aux = [r["train/aux_loss"] for r in rows if "train/aux_loss" in r]
    print("mixtral run: train/aux_loss", [round(a, 4) for a in aux])
    assert len(aux) == 6 and all(a > 0 for a in aux)
    lora, _ = restore_lora(out / "checkpoints")
    ids = token_ids(model.config.vocab_size)
    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf_model(folder), str(out / "adapter"))
    diff = np.abs(torch_logits(pm, ids) - jax_logits(model, ids, lora, cfg.lora)).max()
    print(f"mixtral run's adapter/ in PEFT: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
