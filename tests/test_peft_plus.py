"""[peft+] DoRA, rank/alpha patterns and LoRA+, each checked against the real `peft` (and transformers)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from peft.utils import get_peft_model_state_dict

from jaxlora.config import TrainSection
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale, merge, save_merged, unmerge
from jaxlora.lora.adapters import module_ranks
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models import forward, load_model, load_tokenizer
from jaxlora.peft import load_peft_adapter, save_peft_adapter
from jaxlora.quant import make_quantizer
from jaxlora.train.optim import make_optimizer
from jaxlora.train.step import StepSpec, make_train_step
from tests.helpers.peft_torch import (
    file_shapes,
    hf_model,
    jax_logits,
    jl_config,
    merged_logits,
    peft_config,
    peft_warnings_are_errors,
    same_tensors,
    token_ids,
    torch_logits,
)

DORA_FAMILIES = ("llama", "qwen3", "gpt2")


def randomized_dora(lora: dict, seed: int) -> dict:
    """A, B ~ N(0, 0.1^2) and magnitudes moved by ~10% (they start as ||W||), padding kept zero."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        x = np.asarray(x)
        key = path[-1].key
        if key == "m":
            return jnp.asarray(x * (1 + 0.1 * rng.standard_normal(x.shape)), jnp.float32)
        if key == "s":
            return jnp.asarray(x)
        return jnp.asarray((rng.standard_normal(x.shape) * 0.1) * (x != 0 if key == "a" else 1), jnp.float32)

    out = jax.tree_util.tree_map_with_path(leaf, lora)
    for mods in out.values():  # B rows beyond a layer's rank stay 0 like A's columns
        for ab in mods.values():
            ab["b"] = ab["b"] * jnp.any(ab["a"] != 0, axis=1)[..., None]
    return out


def randomize_peft_dora_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------------------
# DoRA


@pytest.mark.parametrize("family", DORA_FAMILIES)
def test_dora_round_trips_through_peft(family, base, tmp_path):
    folder, model = base(family)
    ids = token_ids(model.config.vocab_size)

    # jaxlora -> PEFT, and merged -> transformers
    lc = jl_config(family, "r8_qv", use_dora=True)
    lora = randomized_dora(init_lora(model.config, lc, jax.random.key(0), params=model.params), 1)
    assert lora[next(iter(lora))][next(iter(lora[next(iter(lora))]))]["m"].ndim == 2  # [L, out]
    ours = jax_logits(model, ids, lora, lc)
    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(folder))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf_model(folder), str(out))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    assert file_shapes(out / "adapter_model.safetensors") == theirs
    assert any(k.endswith("lora_magnitude_vector") for k in theirs)
    d_out = np.abs(torch_logits(pm, ids) - ours).max()
    d_merged = np.abs(merged_logits(save_merged(tmp_path / "merged", model, lora, lc), ids) - ours).max()
    merged = dataclasses.replace(model, params=merge(model.params, lora, lora_scale(model.config, lc)))
    in_memory = jax_logits(merged, ids)
    d_mem = np.abs(in_memory - ours).max()

    # PEFT (all-linear, rsLoRA, r=16) -> jaxlora, re-exported as PEFT's own tensors
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(folder), peft_config(family, "r16_rslora_all", use_dora=True))
    randomize_peft_dora_(pm, 2)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora2, lc2 = load_peft_adapter(tmp_path / "peft", model.config)
    assert lc2.use_dora and lc2.use_rslora and lc2.r == 16
    d_in = np.abs(jax_logits(model, ids, lora2, lc2) - ref).max()
    same_tensors(
        save_peft_adapter(tmp_path / "again", lora2, lc2, model.config, str(folder)), tmp_path / "peft"
    )
    print(
        f"{family} DoRA: jaxlora->PEFT {d_out:.2e}, merged {d_merged:.2e}, in-memory merge {d_mem:.2e}, "
        f"PEFT->jaxlora {d_in:.2e}"
    )
    assert max(d_out, d_merged, d_mem, d_in) < 1e-4


def test_dora_on_quantized_bases_and_refusals(base, tmp_path):
    folder, _ = base("qwen3")
    lc = jl_config("qwen3", "r8_qv", use_dora=True)
    for method in ("int8", "nf4"):  # the norm is of the dequantized weights, as PEFT dequantizes
        qmodel = load_model(folder, quantizer=make_quantizer(method))
        ids = token_ids(qmodel.config.vocab_size)
        fresh = init_lora(qmodel.config, lc, jax.random.key(0), params=qmodel.params)  # m = ||dequant(W)||
        assert np.abs(jax_logits(qmodel, ids, fresh, lc) - jax_logits(qmodel, ids)).max() < 1e-5  # identity
        lora = randomized_dora(fresh, 3)
        ours = jax_logits(qmodel, ids, lora, lc)
        out = save_merged(tmp_path / f"merged_{method}", qmodel, lora, lc, dtype="float32")
        diff = np.abs(merged_logits(out, ids) - ours).max()
        print(f"DoRA on a {method} base, merged into the dequantized weights: {diff:.2e}")
        assert diff < 1e-4

    with pytest.raises(UserError, match="use_dora needs the base weights"):
        init_lora(qmodel.config, lc, jax.random.key(0))
    with pytest.raises(UserError, match="DoRA merge cannot be undone"):
        unmerge(qmodel.params, lora, lora_scale(qmodel.config, lc))
    plain = jl_config("qwen3", "r8_qv")
    with pytest.raises(UserError, match="has a DoRA magnitude"):
        save_peft_adapter(tmp_path / "x", lora, plain, qmodel.config, "x")


# ----------------------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern

RANKS = {"layers.1.self_attn.q_proj": 2, "v_proj": 6}  # PEFT keys: regexes matched at the end of names
ALPHAS = {"q_proj": 4, "layers.0.mlp.down_proj": 3}
PATTERN_TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_rank_and_alpha_patterns_round_trip(base, tmp_path):
    folder, model = base("llama")
    ids = token_ids(model.config.vocab_size)

    # PEFT -> jaxlora -> PEFT and merged
    pm = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=PATTERN_TARGETS,
            rank_pattern=RANKS,
            alpha_pattern=ALPHAS,
            task_type="CAUSAL_LM",
        ),
    )
    randomize_peft_dora_(pm, 4)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    assert dict(lc.rank_pattern) == RANKS and dict(lc.alpha_pattern) == ALPHAS
    assert lora["attn"]["q_proj"]["a"].shape == (2, 32, 8)  # layer 1's rank 2 is zero-padded to 8
    assert not np.asarray(lora["attn"]["q_proj"]["a"][1, :, 2:]).any()
    d_in = np.abs(jax_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, model.config, str(folder))
    same_tensors(again, tmp_path / "peft")
    with peft_warnings_are_errors():
        d_back = np.abs(
            torch_logits(PeftModel.from_pretrained(hf_model(folder), str(again)), ids) - ref
        ).max()
    d_merged = np.abs(merged_logits(save_merged(tmp_path / "merged", model, lora, lc), ids) - ref).max()

    # jaxlora-made (gaussian init: std 1/r per layer) -> PEFT
    lc2 = LoraConfig(
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=PATTERN_TARGETS,
        rank_pattern=RANKS,
        alpha_pattern=ALPHAS,
        init="gaussian",
    )
    fresh = init_lora(model.config, lc2, jax.random.key(0))
    ranks = module_ranks(model.config, lc2)
    assert ranks[("attn", "q_proj")].tolist() == [8, 2] and ranks[("attn", "v_proj")].tolist() == [6, 6]
    a1 = np.asarray(fresh["attn"]["q_proj"]["a"][1])  # [in, 8], rank 2: std 1/2, then zeros
    assert not a1[:, 2:].any() and 0.3 < a1[:, :2].std() < 0.7
    lora2 = randomized_dora(fresh, 5)
    ours = jax_logits(model, ids, lora2, lc2)
    out = save_peft_adapter(tmp_path / "mine", lora2, lc2, model.config, str(folder))
    with peft_warnings_are_errors():
        pm2 = PeftModel.from_pretrained(hf_model(folder), str(out))
    assert file_shapes(out / "adapter_model.safetensors") == {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm2).items()
    }
    d_out = np.abs(torch_logits(pm2, ids) - ours).max()

    # the zero padding is exact in training: padded A columns and B rows get no gradient, "s" none either
    def loss(lo):
        return jnp.sum(jax_forward(model, ids, lo, lc2) ** 2)

    grads = jax.grad(loss)(lora2)
    gq = grads["attn"]["q_proj"]
    assert not np.asarray(gq["a"][1, :, 2:]).any() and not np.asarray(gq["b"][1, 2:]).any()
    assert np.asarray(gq["a"][1, :, :2]).any() and not np.asarray(gq["s"]).any()
    print(f"patterns: PEFT->jaxlora {d_in:.2e}, back {d_back:.2e}, merged {d_merged:.2e}, ", end="")
    print(f"jaxlora->PEFT {d_out:.2e}")
    assert max(d_in, d_back, d_merged, d_out) < 1e-4


def jax_forward(model, ids, lora, lc):
    scale = lora_scale(model.config, lc)
    return forward(model.params, model.config, jnp.asarray(ids), lora=lora, lora_scale=scale)


# ----------------------------------------------------------------------------------------------------------
# LoRA+


def test_loraplus_lr_ratio_as_peft(base):
    folder, model = base("llama")
    ratio = 16.0
    # PEFT's grouping: lora_B and DoRA magnitudes at ratio x lr, lora_A at lr
    pm = get_peft_model(hf_model(folder), peft_config("llama", "r8_qv", use_dora=True))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    kinds = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            kind = "m" if "magnitude" in name else "b" if "lora_B" in name else "a"
            kinds.setdefault(kind, set()).add(lr_of[id(p)] / 1e-3)
    assert kinds == {"a": {1.0}, "b": {ratio}, "m": {ratio}}, kinds

    # jaxlora's: one step from the same gradient moves B and m ratio x as far as A (Adam's first step is
    # lr * g / (|g| + eps)), and the optax state holds one Adam per group
    train = TrainSection(
        learning_rate=1e-3,
        lr_schedule="constant",
        warmup_steps=0,
        max_grad_norm=None,
        loraplus_lr_ratio=ratio,
    )
    tx, _ = make_optimizer(train, 10)
    lc = jl_config("llama", "r8_qv", use_dora=True)
    lora = init_lora(model.config, lc, jax.random.key(0), params=model.params)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.float32), lora)
    state = tx.init(lora)
    assert set(state.inner_states) == {"a", "b"}
    updates, _ = tx.update(grads, state, lora)
    for leaf in updates["attn"].values():
        ua, ub, um = (np.abs(np.asarray(leaf[k])) for k in ("a", "b", "m"))
        np.testing.assert_allclose(ub, ratio * ua.mean(), rtol=1e-5)
        np.testing.assert_allclose(um, ratio * ua.mean(), rtol=1e-5)
        np.testing.assert_allclose(ua, 1e-3, rtol=1e-5)
    plain, _ = make_optimizer(train.model_copy(update={"loraplus_lr_ratio": None}), 10)
    assert isinstance(plain.init(lora), tuple)  # no LoRA+: AdamW's own state, as before


# ----------------------------------------------------------------------------------------------------------
# A DoRA fine-tune of the real stories260K, with rank/alpha patterns, LoRA+, dropout and weight decay


def test_stories_dora_finetune_loss_falls_and_exports(stories_dir, tmp_path):
    model = load_model(stories_dir)
    tok = load_tokenizer(stories_dir)
    text = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog."
    row = tok(text)["input_ids"][:24]
    ids = np.asarray([row[:-1]] * 4, np.int32)  # [B, T]
    batch = {
        "input_ids": ids,
        "targets": np.asarray([row[1:]] * 4, np.int32),
        "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape),
        "segment_ids": np.ones_like(ids),
    }
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [A=1, B, T]
    lc = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 4},
    )
    train = TrainSection(
        learning_rate=5e-3, lr_schedule="constant", warmup_steps=0, weight_decay=0.01, loraplus_lr_ratio=4.0
    )
    tx, _ = make_optimizer(train, 12)
    lora = init_lora(model.config, lc, jax.random.key(0), params=model.params)
    step = jax.jit(make_train_step(StepSpec(model.config, lc.dropout, 1024), tx))
    scale = jnp.asarray(lora_scale(model.config, lc))
    adapter = Adapter.split(lora)
    start, opt_state, losses = lora, tx.init(adapter.trainable), []
    for i in range(12):
        adapter, opt_state, metrics = step(adapter, opt_state, model.params, batch, jax.random.key(i), scale)
        losses.append(float(metrics["loss"]))
    lora = adapter.tree()
    print(f"stories260K DoRA fine-tune: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.9 * losses[0]
    v = lora["attn"]["v_proj"]
    assert not np.asarray(v["a"][:, :, 2:]).any() and not np.asarray(v["b"][:, 2:]).any()  # padding
    assert np.array_equal(np.asarray(v["s"]), np.asarray(start["attn"]["v_proj"]["s"]))  # scales fixed
    assert not np.allclose(np.asarray(v["m"]), np.asarray(start["attn"]["v_proj"]["m"]))  # magnitudes train

    out = save_peft_adapter(tmp_path / "adapter", lora, lc, model.config, str(stories_dir))
    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf_model(stories_dir), str(out))
    test_ids = np.asarray(ids[:1])
    diff = np.abs(torch_logits(pm, test_ids) - jax_logits(model, test_ids, lora, lc)).max()
    print(f"trained DoRA + patterns adapter in PEFT: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------------------
# PiSSA / OLoRA: the base keeps the residual; the export is converted to apply to the original base


def peft_kernel(pm, layer: int, name: str) -> np.ndarray:
    """The (possibly residual) base weight of PEFT's q_proj/v_proj in jaxlora's [in, out] layout."""
    mod = pm.base_model.model.model.layers[layer].self_attn
    return getattr(mod, name).base_layer.weight.detach().numpy().T


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_pissa_olora_init_and_converted_export(init, base, tmp_path):
    folder, model = base("llama")
    ids = token_ids(model.config.vocab_size)
    lc = jl_config("llama", "r8_qv", init=init)
    scale = lora_scale(model.config, lc)
    initial = init_lora(model.config, lc, jax.random.key(0), params=model.params)
    residual = dataclasses.replace(model, params=unmerge(model.params, initial, scale))
    base_logits = jax_logits(model, ids)
    d_init = np.abs(jax_logits(residual, ids, initial, lc) - base_logits).max()  # unchanged at step 0

    if init != "pissa_niter_4":  # PEFT's randomized SVD draws from torch's generator: not comparable
        pm = get_peft_model(hf_model(folder), peft_config("llama", "r8_qv", init_lora_weights=init))
        for i in range(model.config.num_layers):
            for name in ("q_proj", "v_proj"):
                mine = np.asarray(residual.params["layers"]["attn"][name]["kernel"][i])
                np.testing.assert_allclose(peft_kernel(pm, i, name), mine, atol=2e-5, err_msg=f"{init} {i}")

    # "trained": moved away from the initial adapter; exported converted, on the original base in PEFT
    rng = np.random.default_rng(7)
    trained = jax.tree.map(
        lambda x: x + jnp.asarray(rng.standard_normal(x.shape) * 0.05, jnp.float32), initial
    )
    ours = jax_logits(residual, ids, trained, lc)
    out = save_peft_adapter(tmp_path / "conv", trained, lc, model.config, str(folder), initial_lora=initial)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["init_lora_weights"]) == (16, 32, True)
    with peft_warnings_are_errors():
        pm2 = PeftModel.from_pretrained(hf_model(folder), str(out))  # the ORIGINAL base
    d_conv = np.abs(torch_logits(pm2, ids) - ours).max()
    lora2, lc2 = load_peft_adapter(out, model.config)  # and back in jaxlora, on the original base
    d_back = np.abs(jax_logits(model, ids, lora2, lc2) - ours).max()
    d_merged = 0.0
    if init == "pissa":  # merged: the residual plus the trained adapter is the original plus the update
        d_merged = np.abs(
            merged_logits(save_merged(tmp_path / "merged", residual, trained, lc), ids) - ours
        ).max()
    print(
        f"{init}: init identity {d_init:.2e}, converted export in PEFT {d_conv:.2e}, "
        f"re-imported {d_back:.2e}, merged {d_merged:.2e}"
    )
    assert max(d_init, d_conv, d_back, d_merged) < 1e-4


def test_pissa_made_in_peft_converted_imports_and_refusals(base, tmp_path):
    folder, model = base("llama")
    ids = token_ids(model.config.vocab_size)
    pm = get_peft_model(hf_model(folder), peft_config("llama", "r8_qv", init_lora_weights="pissa"))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter first
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref = torch_logits(pm.eval(), ids)  # on PEFT's residual base
    pm.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lora, lc = load_peft_adapter(tmp_path / "final", model.config)
    diff = np.abs(jax_logits(model, ids, lora, lc) - ref).max()  # jaxlora on the ORIGINAL base
    print(f"PEFT PiSSA adapter converted by PEFT, in jaxlora on the original base: {diff:.2e}")
    assert diff < 1e-4 and lc.r == 16

    qmodel = load_model(folder, quantizer=make_quantizer("int8"))
    with pytest.raises(
        UserError, match="lora.init pissa on the quantized .* initialized on the float weights"
    ):
        init_lora(qmodel.config, jl_config("llama", "r8_qv", init="pissa"), jax.random.key(0), qmodel.params)
    gpt2_folder, gpt2 = base("gpt2")
    with pytest.raises(UserError, match="olora does not support GPT-2"):
        init_lora(gpt2.config, jl_config("gpt2", "r8_qv", init="olora"), jax.random.key(0), gpt2.params)
    with pytest.raises(UserError, match="lora.init must be default, gaussian, pissa, pissa_niter_N"):
        LoraConfig(init="pissa_niter_x")


# ----------------------------------------------------------------------------------------------------------
# Trainable tokens: only the chosen rows of the (tied) embedding train


def token_logits(model, ids, lora, lc) -> np.ndarray:
    """jaxlora's logits with the trainable rows written into the embedding first (`with_embeddings`)."""
    params, layers_lora = with_embeddings(model.params, lora)
    return jax_logits(dataclasses.replace(model, params=params), ids, layers_lora, lc)


def test_trainable_tokens_round_trip_and_training(base, tmp_path):
    folder, model = base("llama_tied_mqa")  # tied: the LM head reads the new rows too
    cfg = model.config
    new_tokens = [5, 7]
    ids = token_ids(cfg.vocab_size)
    ids[:, :2] = new_tokens

    # PEFT -> jaxlora -> PEFT
    pm = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=new_tokens),
    )
    randomize_peft_dora_(pm, 8)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", cfg)
    assert lc.trainable_token_indices == tuple(new_tokens)
    d_in = np.abs(token_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, cfg, str(folder))
    same_tensors(again, tmp_path / "peft")
    with peft_warnings_are_errors():
        d_back = np.abs(
            torch_logits(PeftModel.from_pretrained(hf_model(folder), str(again)), ids) - ref
        ).max()
    d_merged = np.abs(merged_logits(save_merged(tmp_path / "merged", model, lora, lc), ids) - ref).max()

    # jaxlora: a few train steps move the new tokens' rows and nothing else of the embedding
    lc2 = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], trainable_token_indices=new_tokens)
    start = init_lora(cfg, lc2, jax.random.key(0), params=model.params)
    assert np.array_equal(
        np.asarray(start["embed"]["rows"]), np.asarray(model.params["embed"]["embedding"])[new_tokens]
    )
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": np.broadcast_to(np.arange(ids.shape[1] - 1, dtype=np.int32), ids[:, :-1].shape),
        "segment_ids": np.ones_like(ids[:, :-1]),
    }
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    train = TrainSection(learning_rate=1e-2, lr_schedule="constant", warmup_steps=0, weight_decay=0.1)
    tx, _ = make_optimizer(train, 3)
    step = jax.jit(make_train_step(StepSpec(cfg, 0.0, 1024), tx))
    adapter, opt = Adapter.split(start), tx.init(Adapter.split(start).trainable)
    for i in range(3):
        adapter, opt, _ = step(
            adapter, opt, model.params, batch, jax.random.key(i), jnp.asarray(lora_scale(cfg, lc2))
        )
    lora2 = adapter.tree()
    before = np.asarray(with_embeddings(model.params, start)[0]["embed"]["embedding"])
    after = np.asarray(with_embeddings(model.params, lora2)[0]["embed"]["embedding"])
    changed = np.flatnonzero(np.any(before != after, axis=1)).tolist()
    assert changed == new_tokens, changed
    assert np.array_equal(np.asarray(lora2["embed"]["token_ids"]), np.asarray(new_tokens, np.float32))
    out = save_peft_adapter(tmp_path / "mine", lora2, lc2, cfg, str(folder))
    with peft_warnings_are_errors():
        pm2 = PeftModel.from_pretrained(hf_model(folder), str(out))
    d_out = np.abs(torch_logits(pm2, ids) - token_logits(model, ids, lora2, lc2)).max()
    print(f"trainable tokens: PEFT->jaxlora {d_in:.2e}, back {d_back:.2e}, merged {d_merged:.2e}, ", end="")
    print(f"trained jaxlora->PEFT {d_out:.2e}")
    assert max(d_in, d_back, d_merged, d_out) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# lora_bias: lora_B's own bias (the llama tiny config has biases on every linear layer)


def test_lora_bias_round_trip(base, tmp_path):
    folder, model = base("llama")
    ids = token_ids(model.config.vocab_size)
    pm = get_peft_model(hf_model(folder), peft_config("llama", "r8_qv", lora_bias=True))
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", model.config)
    assert lc.lora_bias and lora["attn"]["q_proj"]["bias"].shape == (2, 48)
    d_in = np.abs(jax_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, model.config, str(folder))
    same_tensors(again, tmp_path / "peft")
    with peft_warnings_are_errors():
        d_back = np.abs(
            torch_logits(PeftModel.from_pretrained(hf_model(folder), str(again)), ids) - ref
        ).max()
    d_merged = np.abs(merged_logits(save_merged(tmp_path / "merged", model, lora, lc), ids) - ref).max()
    merged = dataclasses.replace(model, params=merge(model.params, lora, lora_scale(model.config, lc)))
    d_mem = np.abs(jax_logits(merged, ids) - ref).max()
    fresh = init_lora(model.config, lc, jax.random.key(0), params=model.params)
    assert not np.asarray(fresh["attn"]["v_proj"]["bias"]).any()  # zero at init, as PEFT
    print(
        f"lora_bias: PEFT->jaxlora {d_in:.2e}, back {d_back:.2e}, merged {d_merged:.2e}, "
        f"in memory {d_mem:.2e}"
    )
    assert max(d_in, d_back, d_merged, d_mem) < 1e-4
    _, qwen = base("qwen3")  # no biases on q_proj/v_proj: refused, as the adapter could not be merged
    with pytest.raises(UserError, match="lora.lora_bias on .* which have no bias"):
        init_lora(qwen.config, jl_config("qwen3", "r8_qv", lora_bias=True), jax.random.key(0), qwen.params)


# ----------------------------------------------------------------------------------------------------------
# modules_to_save: full trainable copies of the embedding and the LM head


@pytest.mark.parametrize("family", ["llama", "llama_tied_mqa"])
def test_modules_to_save_round_trip(family, base, tmp_path):
    folder, model = base(family)
    cfg = model.config
    tied = cfg.tie_word_embeddings
    ids = token_ids(cfg.vocab_size)
    extra = {"ensure_weight_tying": True} if tied else {}  # PEFT's tied copy, what jaxlora keeps
    pm = get_peft_model(
        hf_model(folder),
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], **extra
        ),
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", cfg)
    assert sorted(lora["modules_to_save"]) == (["embed"] if tied else ["embed", "lm_head"])
    d_in = np.abs(token_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, cfg, str(folder))
    same_tensors(again, tmp_path / "peft")
    with peft_warnings_are_errors():
        d_back = np.abs(
            torch_logits(PeftModel.from_pretrained(hf_model(folder), str(again)), ids) - ref
        ).max()
    d_merged = np.abs(merged_logits(save_merged(tmp_path / "merged", model, lora, lc), ids) - ref).max()
    fresh = init_lora(cfg, lc, jax.random.key(0), params=model.params)  # copies of the base at init
    assert np.array_equal(
        np.asarray(fresh["modules_to_save"]["embed"]), np.asarray(model.params["embed"]["embedding"])
    )
    print(f"{family} modules_to_save: PEFT->jaxlora {d_in:.2e}, back {d_back:.2e}, merged {d_merged:.2e}")
    assert max(d_in, d_back, d_merged) < 1e-4


def test_pissa_training_run_exports_for_the_original_base(assets, stories_dir, tmp_path):
    """A PiSSA run end to end: training on the residual base, its `adapter/` and `export --run` (PEFT and
    merged) all give, on the ORIGINAL base in PyTorch, the logits jaxlora computes with what it trained."""
    from jaxlora.cli.export import run_export
    from jaxlora.config import load_config
    from jaxlora.train import train
    from jaxlora.train.checkpoint import restore_lora
    from jaxlora.train.state import initial_adapter, residual_base

    out = tmp_path / "run"
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "stories260k-alpaca.yaml",
        [
            f"output_dir={out}",
            f"model.path={stories_dir}",
            f"data.train[0].path={assets / 'data' / 'alpaca_cleaned_1000.json'}",
            "lora.init=pissa",
            "lora.r=4",
            "lora.target_modules=[q_proj,v_proj]",
            "data.seq_len=128",
            "train.batch_size=2",
            "train.max_steps=4",
            "train.learning_rate=1e-2",
            "train.eval_every_steps=null",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train(cfg)
    model = load_model(stories_dir)
    lora, step = restore_lora(out / "checkpoints")
    assert step == 4
    initial = initial_adapter(cfg, model.config, model.params)
    assert not np.allclose(np.asarray(lora["attn"]["q_proj"]["b"]), initial["attn"]["q_proj"]["b"])  # trained
    residual = dataclasses.replace(model, params=residual_base(model.params, initial, cfg, model.config))
    ids = token_ids(model.config.vocab_size)
    ours = jax_logits(residual, ids, lora, cfg.lora)  # what training computes
    assert np.abs(ours - jax_logits(model, ids)).max() > 1e-3  # the adapter changed the model

    exported = run_export(None, None, "peft", str(tmp_path / "export"), run=str(out))
    merged = run_export(None, None, "merged", str(tmp_path / "merged"), run=str(out))
    for adapter in (out / "adapter", exported):
        with peft_warnings_are_errors():
            pm = PeftModel.from_pretrained(hf_model(stories_dir), str(adapter))
        diff = np.abs(torch_logits(pm, ids) - ours).max()
        print(f"PiSSA run, {adapter.name} on the original base in PEFT: max |logits diff| = {diff:.2e}")
        assert diff < 1e-4
    diff = np.abs(merged_logits(merged, ids) - ours).max()
    print(f"PiSSA run, merged export in transformers: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
