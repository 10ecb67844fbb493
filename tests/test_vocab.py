"""[peft+] Tokens added to the tokenizer: the vocabulary grown as transformers grows it, and adapters on a
resized base exchanged with the real `peft` (its `save_embedding_layers` layout), both ways and merged."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file

from jaxlora.lora import LoraConfig, init_lora, save_merged
from jaxlora.lora.tokens import EXTRA_KEYS, MODULES, RESIZED, TOKENS, resized_entry, with_embeddings
from jaxlora.models import load_model
from jaxlora.models.vocab import grow_vocab, new_rows
from jaxlora.peft import load_peft_adapter, save_peft_adapter
from tests.helpers.hf_tiny import make_hf_model
from tests.helpers.peft_torch import (
    hf_model,
    jax_logits,
    merged_logits,
    peft_warnings_are_errors,
    randomized,
    same_tensors,
    token_ids,
    torch_logits,
)

ADDED = 3  # tokens added on top of each tiny base's vocabulary


def _ids(vocab: int) -> np.ndarray:
    """Token ids that include the new tokens `vocab - ADDED .. vocab - 1`."""
    ids = token_ids(vocab - ADDED)
    ids[:, 1:4] = np.arange(vocab - ADDED, vocab)
    ids[1, 6] = vocab - 1
    return ids


def _logits(model, ids, lora, lc) -> np.ndarray:
    params, layers = with_embeddings(model.params, lora)
    return jax_logits(dataclasses.replace(model, params=params), ids, layers, lc)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_grown_rows_follow_transformers_mean_resizing(family, base, tmp_path):
    folder, model = base(family)
    cfg = model.config
    hf = hf_model(folder)
    hf.resize_token_embeddings(cfg.vocab_size + ADDED)  # mean_resizing=True, transformers' default
    rows = new_rows(model.params, cfg, cfg.vocab_size + ADDED, seed=0)
    params, grown = grow_vocab(model.params, cfg, rows)
    assert grown.vocab_size == cfg.vocab_size + ADDED
    pairs = [
        (params["embed"]["embedding"], hf.get_input_embeddings().weight, model.params["embed"]["embedding"])
    ]
    if not cfg.tie_word_embeddings:
        pairs.append((params["lm_head"]["kernel"].T, hf.lm_head.weight, model.params["lm_head"]["kernel"].T))
    for ours, theirs, old in pairs:
        ours, theirs, old = np.asarray(ours), theirs.detach().numpy(), np.asarray(old)
        n = old.shape[0]
        assert np.array_equal(ours[:n], old) and np.array_equal(theirs[:n], old)
        mean = old.mean(axis=0)
        # both draw from N(mean, 1e-9 cov): a few 1e-6 from the mean, and not the mean itself
        assert 0 < np.abs(ours[n:] - mean).max() < 1e-4
        assert np.abs(ours[n:] - theirs[n:]).max() < 1e-4
    # a vocabulary no larger than the width has a singular covariance: both use the mean itself
    small = tmp_path / "small"
    hf_small = make_hf_model(family, small, vocab_size=16)
    hf_small.resize_token_embeddings(16 + ADDED)
    m = load_model(small)
    got = new_rows(m.params, m.config, 16 + ADDED, seed=0)["embed"]
    theirs = hf_small.get_input_embeddings().weight.detach().numpy()[16:]
    assert np.allclose(got, theirs, atol=1e-7) and np.allclose(got, got[0])


# ----------------------------------------------------------------------------------------------------------
# Adapters on a resized base, both ways, for plain LoRA, trainable tokens and modules_to_save


def _options(family: str, mode: str, vocab: int, tied: bool) -> dict:
    new = list(range(vocab - ADDED, vocab))
    if mode == "tokens":
        return {"trainable_token_indices": new}
    if mode == "copies":
        names = ["wte" if family == "gpt2" else "embed_tokens", "lm_head"]
        tie = tied and family != "gpt2"  # PEFT ties embed_tokens/lm_head copies, not GPT-2's wte
        return {"modules_to_save": names, **({"ensure_weight_tying": True} if tie else {})}
    return {}


def _targets(family: str) -> list[str]:
    return ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]


@pytest.mark.parametrize("mode", ["plain", "tokens", "copies"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_adapter_on_a_resized_base_round_trips_through_peft(family, mode, base, tmp_path):
    folder, model = base(family)
    cfg = model.config
    vocab = cfg.vocab_size + ADDED
    ids = _ids(vocab)
    opts = _options(family, mode, vocab, cfg.tie_word_embeddings)

    def resized_hf():
        hf = hf_model(folder)
        hf.resize_token_embeddings(vocab)
        return hf

    # PEFT -> jaxlora (on the base as loaded: the file carries the grown layers) -> PEFT, merged
    pm = get_peft_model(
        resized_hf(),
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=_targets(family), fan_in_fan_out=family == "gpt2", **opts
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:  # the same change to both copies: they stay tied where tied
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
            elif p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    lora, lc = load_peft_adapter(tmp_path / "peft", cfg)
    assert lora[RESIZED]["embed"].shape == (vocab, cfg.hidden_size)
    d_in = np.abs(_logits(model, ids, lora, lc) - ref).max()
    again = save_peft_adapter(tmp_path / "again", lora, lc, cfg, str(folder))
    same_tensors(again, tmp_path / "peft")
    with peft_warnings_are_errors():
        d_back = np.abs(torch_logits(PeftModel.from_pretrained(resized_hf(), str(again)), ids) - ref).max()
    merged = save_merged(tmp_path / "merged", model, lora, lc)
    d_merged = np.abs(merged_logits(merged, ids) - ref).max()

    # jaxlora: a grown base, an adapter made on it -> PEFT on a base resized by transformers
    rows = new_rows(model.params, cfg, vocab, seed=1)
    params, grown_cfg = grow_vocab(model.params, cfg, rows)
    grown = dataclasses.replace(model, params=params, config=grown_cfg)
    jl = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=_targets(family), **opts)
    mine = init_lora(grown_cfg, jl, jax.random.key(0), params=params)
    mine = {k: v if k in EXTRA_KEYS else randomized(v, 4) for k, v in mine.items()}
    if TOKENS in mine:  # the new tokens' rows trained, their ids kept
        mine[TOKENS] = {**mine[TOKENS], "rows": randomized(mine[TOKENS]["rows"], 5)}
    if MODULES in mine:
        mine[MODULES] = {k: v + randomized(v, 6, 0.01) for k, v in mine[MODULES].items()}
    ours = _logits(grown, ids, mine, jl)
    out = save_peft_adapter(
        tmp_path / "mine", {**mine, RESIZED: resized_entry(params, grown_cfg)}, jl, grown_cfg, str(folder)
    )
    assert (
        load_file(str(out / "adapter_model.safetensors")).keys()
        == load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    )
    with peft_warnings_are_errors():
        d_out = np.abs(torch_logits(PeftModel.from_pretrained(resized_hf(), str(out)), ids) - ours).max()
    print(
        f"{family} {mode} on a resized base: PEFT->jaxlora {d_in:.2e}, back {d_back:.2e}, "
        f"merged {d_merged:.2e}, jaxlora->PEFT {d_out:.2e}"
    )
    assert max(d_in, d_back, d_merged, d_out) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# A training run that adds ChatML's markers to stories260K (configs/stories260k-chatml-tokens.yaml)


@pytest.fixture(scope="module")
def chatml_run(assets, tmp_path_factory):
    """(run folder, config): four steps of the recipe, with its adapter/ and checkpoint."""
    from jaxlora.config import config_from_dict
    from jaxlora.train import train
    from tests.helpers.recipes import set_dotted, stories_recipe

    out = tmp_path_factory.mktemp("chatml") / "run"
    raw = stories_recipe(assets, out, "stories260k-chatml-tokens.yaml", "sharegpt_500.json")
    set_dotted(raw, {"train.max_steps": 4, "train.eval_every_steps": None, "logging.progress_bar": False})
    cfg = config_from_dict(raw)
    train(cfg)
    return out, cfg


def test_run_trains_the_new_rows_and_exports_for_a_resized_base(chatml_run, stories_dir, tmp_path):
    from transformers import AutoTokenizer

    from jaxlora.cli.export import run_export
    from jaxlora.train.checkpoint import restore_lora
    from jaxlora.train.vocab import grow_base, read_run_vocab

    out, cfg = chatml_run
    tok = AutoTokenizer.from_pretrained(out / "adapter")  # saved beside the adapter
    new = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(tok) == 514 and new == [512, 513]
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 512  # one token, not split

    # the base the run trained on: stories260K grown by the rows the run drew (and saved)
    model = load_model(stories_dir)
    _, rows = read_run_vocab(out)
    grown, again = grow_base(model, 514, cfg.seed)
    assert np.array_equal(again["embed"], rows["embed"])  # the draw is the run's own, reproducibly
    lora, step = restore_lora(out / "checkpoints")
    assert step == 4
    before = np.asarray(grown.params["embed"]["embedding"])
    after = np.asarray(with_embeddings(grown.params, lora)[0]["embed"]["embedding"])
    changed = np.flatnonzero(np.any(before != after, axis=1)).tolist()
    assert changed == new, changed  # the new tokens' rows trained, no other row moved

    ids = np.asarray([[1, 512, 1404, 29901, 13, 513, 512, 6034], [1, 512, 1792, 13, 15043, 29991, 513, 2]])
    ids = np.clip(ids, 0, 513).astype(np.int32)
    ours = _logits(grown, ids, lora, cfg.lora)
    assert np.abs(ours - jax_logits(grown, ids)).max() > 1e-3  # the adapter changed the model

    # PyTorch: resize the base to the adapter's tokenizer, then load the adapter (PEFT's own recipe)
    hf = hf_model(stories_dir)
    hf.resize_token_embeddings(len(tok))
    with peft_warnings_are_errors():
        pm = PeftModel.from_pretrained(hf, str(out / "adapter"))
    d_peft = np.abs(torch_logits(pm, ids) - ours).max()
    merged = run_export(None, None, "merged", str(tmp_path / "merged"), run=str(out))
    d_merged = np.abs(merged_logits(merged, ids) - ours).max()
    assert len(AutoTokenizer.from_pretrained(merged)) == 514
    print(f"chatml run: adapter/ in PEFT on a resized base {d_peft:.2e}, merged export {d_merged:.2e}")
    assert max(d_peft, d_merged) < 1e-4


def test_added_tokens_that_nothing_trains_are_refused(assets, tmp_path):
    from jaxlora.config import config_from_dict
    from jaxlora.errors import UserError
    from jaxlora.train import train
    from tests.helpers.recipes import set_dotted, stories_recipe

    raw = stories_recipe(assets, tmp_path / "run", "stories260k-chatml-tokens.yaml", "sharegpt_500.json")
    with pytest.raises(UserError, match=r"new tokens \['<\|im_end\|>'\] get embedding rows that nothing"):
        train(config_from_dict(set_dotted(raw, {"lora.trainable_token_indices": ["<|im_start|>"]})))
    with pytest.raises(UserError, match="'<tool>' is not a token of the tokenizer"):
        train(config_from_dict(set_dotted(raw, {"lora.trainable_token_indices": ["<|im_start|>", "<tool>"]})))
    assert not (tmp_path / "run").exists()  # a failed setup leaves nothing behind
