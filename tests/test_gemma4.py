"""[frontier] Gemma 4's text decoder (`gemma4_text`) against transformers and PEFT: per-layer input
embeddings, KV-shared layers, full layers of another head dim (and with `attention_k_eq_v` one kv head
whose keys are the values), proportional RoPE, final soft-capping.

Two tiny random `Gemma4ForCausalLM` (tests/helpers/hf_gemma4.py: 4 layers, sliding and full alternating,
the last 2 KV-shared; with and without k_eq_v; stories260K's tokenizer beside them) are built once per
module and serve every check.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from jax import numpy as jnp
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora, target_paths
from jaxlora.models import config_from_hf, forward, load_model
from jaxlora.models.families import FAMILIES
from jaxlora.models.gemma4_spec import kv_source
from jaxlora.models.random_weights import init_params
from jaxlora.models.targets import linear_modules
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import QuantizedTensor, count_params, dequantize, make_quantizer
from jaxlora.train.memory_plan import plan_memory
from tests.helpers.family_checks import merged_export_gap, peft_export_gap
from tests.helpers.hf_gemma4 import gemma4_config, make_gemma4
from tests.helpers.hf_tiny import hf_forward, padded_batch
from tests.helpers.parallel_runs import _config, _drive
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    randomize_peft_,
    randomized,
    token_ids,
    torch_logits,
)

LORA = LoraConfig(r=8, alpha=16, dropout=0.0, use_rslora=True, target_modules="all-linear")
# The one linear PEFT's all-linear adapts that jaxlora cannot: PLE's projection, outside the layers.
OUTSIDE_LAYERS = "per_layer_model_projection"
ROOT = Path(__file__).resolve().parents[1]
# The MoE block (as in 26B-A4B): 4 experts, top-2, beside the MLP; no PLE, no KV-shared layers.
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
VARIANTS = {
    "plain": {"use_double_wide_mlp": True},  # as E2B: the KV-shared layers' MLPs twice as wide
    "k_eq_v": {"k_eq_v": True},
    "moe": {"k_eq_v": True, **MOE, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0},
}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, stories_dir):
    """{"plain" | "k_eq_v" | "moe": (folder, torch model, jaxlora Model)}, built once."""
    out = {}
    for name, kw in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"gemma4_{name}")
        hf = make_gemma4(folder, stories_dir, **kw)
        out[name] = (folder, hf, load_model(folder))
    return out


def test_layout_by_kind(built):
    _, _, model = built["k_eq_v"]
    cfg, layers = model.config, model.params["layers"]
    assert cfg.mixers == ("sliding_attention+sliding_kv", "full_attention+full_kv", "sliding_attention",
                          "full_attention")  # fmt: skip
    assert kv_source(cfg) == (0, 1, 0, 1)
    assert layers["attn"]["q_proj"]["kernel"].shape == (2, 32, 4 * 8)  # both sliding layers
    assert layers["attn"]["k_proj"]["kernel"].shape == (1, 32, 2 * 8)  # the one with its own k/v
    assert layers["global_attn"]["q_proj"]["kernel"].shape == (2, 32, 4 * 16)
    assert layers["global_attn"]["k_proj"]["kernel"].shape == (1, 32, 16)  # one kv head, no v_proj
    assert "v_proj" not in layers["global_attn"]
    plain = built["plain"][2].params["layers"]
    assert "v_proj" in plain["global_attn"] and "wide_mlp" not in layers
    assert plain["mlp"]["up_proj"]["kernel"].shape == (2, 32, 48)  # layers 0, 1
    assert plain["wide_mlp"]["up_proj"]["kernel"].shape == (2, 32, 96)  # the KV-shared layers 2, 3
    assert model.params["ple"]["embedding"].shape == (512, 4 * 8)
    assert cfg.rotary_dim == 8 and cfg.global_head_dim == 16 and cfg.attn_scale == 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_on_a_padded_batch(variant, built):
    _, hf, model = built[variant]
    ids, mask, pos = padded_batch(model.config.vocab_size)
    ids_, pos_, mask_ = jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)
    ours = np.asarray(forward(model.params, model.config, ids_, pos_, mask_))
    want = hf_forward(hf, ids, mask, pos).logits.numpy()
    worst = float(np.abs(ours - want)[mask == 1].max())
    print(f"gemma4 ({variant}): max |jaxlora - transformers| logits = {worst:.2e}")
    assert worst < 1e-4


def test_unrolled_equals_the_scan_over_periods(built):
    """The layers with their own k/v, then the KV-shared ones, each a scan over groups of one period of
    their kinds (the MoE model: 2 groups of sliding + full), equal the layers unrolled."""
    _, _, model = built["moe"]
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    scanned = forward(model.params, model.config, ids)
    unrolled = forward(model.params, model.config.with_runtime(scan_layers=False), ids)
    assert float(jnp.abs(scanned - unrolled).max()) < 1e-5


def test_all_linear_targets_are_peft_s_inside_the_layers(built):
    folder, _, model = built["k_eq_v"]
    pm = get_peft_model(hf_model(folder), PeftLoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.split(".")[-1] for n in pm.peft_config["default"].target_modules}
    ours = {name for _, name in target_paths(model.config, LORA)}
    assert theirs - ours == {OUTSIDE_LAYERS} and ours <= theirs, (ours, theirs)
    assert {"per_layer_input_gate", "per_layer_projection", "q_proj", "k_proj", "v_proj"} <= ours


@pytest.mark.parametrize("variant", ["plain", "k_eq_v"])
def test_exported_adapter_loads_in_peft(variant, built, tmp_path):
    folder, _, model = built[variant]
    lora = randomized(init_lora(model.config, LORA, jax.random.key(0)), 1)
    assert lora["global_attn"]["q_proj"]["a"].shape[0] == 2 and lora["attn"]["k_proj"]["a"].shape[0] == 1
    diff, _ = peft_export_gap(model, folder, lora, LORA, token_ids(model.config.vocab_size), tmp_path / "ad")
    print(f"gemma4 ({variant}): jaxlora adapter in PEFT, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def _peft_adapter(folder, targets, path):
    torch.manual_seed(0)
    config = PeftLoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=targets, task_type="CAUSAL_LM"
    )
    pm = get_peft_model(hf_model(folder), config)
    randomize_peft_(pm, 2)
    pm.save_pretrained(path)
    return pm.eval()


def test_peft_made_adapter_imports(built, tmp_path):
    folder, _, model = built["k_eq_v"]
    targets = sorted({name for _, name in target_paths(model.config, LORA)})
    pm = _peft_adapter(folder, targets, tmp_path / "peft")
    ids = token_ids(model.config.vocab_size)
    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    diff = np.abs(jax_logits(model, ids, lora, lc) - torch_logits(pm, ids)).max()
    print(f"gemma4: PEFT adapter in jaxlora, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


def test_peft_adapter_on_ple_projection_is_refused_in_one_line(built, tmp_path):
    folder, _, model = built["plain"]
    _peft_adapter(folder, "all-linear", tmp_path / "peft")
    with pytest.raises(UserError, match=OUTSIDE_LAYERS) as err:
        load_peft_adapter(tmp_path / "peft", model.config)
    assert "\n" not in str(err.value)


def test_merged_export_loads_in_transformers(built, tmp_path):
    _, _, model = built["plain"]
    lora = randomized(init_lora(model.config, LORA, jax.random.key(0)), 3)
    diff = merged_export_gap(model, lora, LORA, token_ids(model.config.vocab_size), tmp_path / "merged")
    print(f"gemma4: merged checkpoint in transformers, max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize(
    "over, what",
    [
        ({"enable_moe_block": True}, "enable_moe_block needs num_experts"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ],
)
def test_unsupported_keys_are_refused_in_one_line(over, what):
    raw = {**gemma4_config().to_dict(), **over}
    with pytest.raises(UserError, match=what) as err:
        config_from_hf(raw)
    assert "\n" not in str(err.value)


def test_text_tower_defaults_equal_transformers():
    from transformers import Gemma4TextConfig

    made = Gemma4TextConfig()
    for key, value in FAMILIES["gemma4_text"].text_config_defaults.items():
        assert getattr(made, key) == value, key


# ----------------------------------------------------------------------------------------------------------
# Training: the real trainer on one device, on fsdp=2 x tensor=2 and on int8 / nf4 bases, one 4-device process

STEPS, MESH_STEPS = 6, 3


@pytest.fixture(scope="module")
def trained(built, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4_train")
    base = {
        "data.seq_len": 128,
        "train.batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.lr_schedule": "constant",
        "train.warmup_steps": 1,
        "train.warmup_ratio": None,
        "train.eval_batches": 2,
        "checkpoint.every_steps": None,
        "lora.dropout": 0.0,
        "lora.target_modules": "all-linear",
        "train.remat": "none",  # compiles faster; the layers are unrolled
        "train.eval_every_steps": None,
    }
    mesh = {"parallel.strategy": "mesh", "parallel.mesh.fsdp": 2, "parallel.mesh.tensor": 2}
    runs = []
    for name, over in (
        ("single", {"train.max_steps": STEPS}),
        ("f2t2", {**mesh, "train.max_steps": MESH_STEPS}),
        *((k, {"quant.weights": k, "train.max_steps": STEPS}) for k in ("int8", "nf4")),
    ):
        cfg = _config(assets, root / name, **base, **over)
        cfg["model"]["path"] = str(built["k_eq_v"][0])
        runs.append({"name": name, "config": cfg})
    return _drive(runs, 4, root / "runs.json")


@pytest.mark.parametrize("run", ["single", "int8", "nf4"])
def test_fine_tune_loss_falls(run, trained):
    """On the float base and on int8 / nf4 ones: the last two train losses average 3% below the first."""
    losses = trained[run]["losses"]
    print(
        f"gemma4 {run}: train losses", [round(losses[s], 3) for s in sorted(losses)], trained[run]["seconds"]
    )
    last = max(losses)
    assert (losses[last] + losses[last - 1]) / 2 < 0.97 * losses[1]


def test_fsdp2_tensor2_equals_one_device(trained):
    a, b = trained["single"]["losses"], trained["f2t2"]["losses"]
    diff = max(abs(a[s] - b[s]) for s in range(1, MESH_STEPS + 1))
    print(f"gemma4: fsdp=2 x tensor=2 vs one device, max train-loss diff {diff:.2e}")
    assert diff < 1e-4


# E2B's text config where it differs from E4B's (the preset), as public transcriptions of
# google/gemma-4-E2B-it's config.json give it: double-wide MLPs on its 20 KV-shared layers.
E2B = dict(
    hidden_size=1536,
    intermediate_size=6144,
    num_hidden_layers=35,
    num_key_value_heads=1,
    num_kv_shared_layers=20,
    use_double_wide_mlp=True,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
)


@pytest.mark.parametrize("size", ["e4b", "e2b"])
def test_e4b_preset_and_e2b_count_as_transformers(size):
    """The benchmark preset (Gemma 4 E4B's text model) and E2B's: as many weights as transformers builds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((ROOT / "benchmarks" / "presets" / "gemma-4-e4b" / "config.json").read_text())
    raw = {**raw, **(E2B if size == "e2b" else {})}
    cfg = config_from_hf(raw)
    full_kv, full = (4, 3) if size == "e4b" else (3, 4)
    assert cfg.mixers.count("full_attention+full_kv" + "+mlp" * (size == "e2b")) == full_kv
    assert cfg.mixers.count("full_attention" + "+wide_mlp" * (size == "e2b")) == full
    ours = count_params(jax.eval_shape(lambda: init_params(cfg)))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))
    theirs = sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for n, b in hf.named_buffers() if "scalar" in n
    )
    print(f"Gemma 4 {size} text model: {ours:,} weights (transformers: {theirs:,})")
    assert ours == theirs


def test_moe_all_linear_equals_peft_router_included(built):
    folder, _, model = built["moe"]
    pm = get_peft_model(hf_model(folder), PeftLoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.split(".")[-1] for n in pm.peft_config["default"].target_modules}
    names = {m.key: m.name for m in linear_modules(model.config)}  # HF module names: router.proj -> proj
    ours = {names[path] for path in target_paths(model.config, LORA)}
    assert ours == theirs and "proj" in ours, (ours, theirs)  # router.proj is an nn.Linear


def test_moe_expert_lora_round_trips_peft_and_merges(built, tmp_path):
    """all-linear (the router's proj included) and both expert weights as `target_parameters`: jaxlora ->
    PEFT, PEFT -> jaxlora, and the merged export in transformers."""
    folder, _, model = built["moe"]
    lc = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", target_parameters=EXPERTS)
    ids = token_ids(model.config.vocab_size)
    lora = randomized(init_lora(model.config, lc, jax.random.key(0)), 1)
    assert set(lora["moe"]) == {"router", "gate_up_proj", "down_proj"}
    exported, _ = peft_export_gap(model, folder, lora, lc, ids, tmp_path / "adapter", pattern_notice=True)
    torch.manual_seed(0)
    made = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=EXPERTS),
    )
    randomize_peft_(made, 2)
    ref = torch_logits(made.eval(), ids)
    made.save_pretrained(tmp_path / "peft")
    back, back_cfg = load_peft_adapter(tmp_path / "peft", model.config)
    imported = np.abs(jax_logits(model, ids, back, back_cfg) - ref).max()
    merged = merged_export_gap(model, lora, lc, ids, tmp_path / "merged")
    print(f"gemma4 MoE: to PEFT {exported:.2e}, from PEFT {imported:.2e}, merged {merged:.2e}")
    assert max(exported, imported, merged) < 1e-4


def test_moe_quantized_base_is_the_model_of_its_dequantized_weights(built):
    """int8: the experts and every linear quantized, the router kept in float; the logits those of the
    dequantized weights (int8 and nf4 bases of the dense model train below)."""
    folder, _, model = built["moe"]
    q = load_model(folder, quantizer=make_quantizer("int8"))
    moe = q.params["layers"]["moe"]
    assert isinstance(moe["gate_up_proj"]["kernel"], QuantizedTensor)
    assert isinstance(q.params["layers"]["global_attn"]["q_proj"]["kernel"], QuantizedTensor)
    assert not isinstance(moe["router"]["kernel"], QuantizedTensor)
    ids = jnp.asarray(token_ids(model.config.vocab_size))
    deq = jax.tree.map(
        lambda x: jnp.asarray(dequantize(x, np.float32)) if isinstance(x, QuantizedTensor) else x,
        q.params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    assert float(jnp.abs(forward(deq, q.config, ids) - forward(q.params, q.config, ids)).max()) < 1e-4


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_plan_counts_equal_transformers_and_peft(quant, built, tmp_path):
    """`jaxlora plan` on the MoE model: its weights are transformers' parameters plus the layer scalars
    (buffers there); its trainable count is PEFT's with all-linear (the router's proj included)."""
    folder, hf, model = built["moe"]
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(folder)},
        "data": {"train": [{"path": str(tmp_path / "none.jsonl"), "format": "alpaca"}], "seq_len": 16},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"batch_size": 2},
        "quant": {"weights": quant},
    }
    counts = plan_memory(config_from_dict(raw), compile_step_too=False)["params"]
    peft = get_peft_model(hf_model(folder), PeftLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert counts["total"] == hf.num_parameters() + model.config.num_layers
    assert counts["trainable"] == peft.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    "over, field", [({"use_dora": True}, "lora.use_dora"), ({"init": "pissa"}, "lora.init")]
)
def test_unchecked_lora_variants_are_refused_in_one_line(over, field, built):
    _, _, model = built["plain"]
    lora_cfg = LoraConfig(**{**LORA.model_dump(), **over})
    with pytest.raises(UserError, match=f"{field}.* is not supported yet for gemma4_text") as err:
        init_lora(model.config, lora_cfg, jax.random.key(0), params=model.params)
    assert "\n" not in str(err.value)
