"""The typed adapter: only `Adapter.trainable` reaches the gradient and AdamW; the frozen leaves (per-module
scales, token ids) never move; and a checkpoint from before the split (AdamW moments for those leaves
too) still resumes, exactly."""

import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxlora.config import config_from_dict
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale
from jaxlora.lora.trainable import FIXED_LEAVES, join
from jaxlora.models import load_model
from jaxlora.train import train
from jaxlora.train.checkpoint import Checkpointer
from jaxlora.train.optim import make_optimizer
from tests.helpers.recipes import tiny_config

PATTERNS = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 4.0}}


def _leaf_names(tree) -> set[str]:
    return {str(path[-1].key) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_split_keeps_fixed_leaves_out_of_the_optimizer(stories_dir):
    model = load_model(stories_dir)
    lc = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                    trainable_token_indices=[3, 7], **PATTERNS)  # fmt: skip
    tree = init_lora(model.config, lc, jax.random.key(0), params=model.params)
    adapter = Adapter.split(tree)
    assert _leaf_names(adapter.trainable) == {"a", "b", "rows"}
    assert _leaf_names(adapter.frozen) == set(FIXED_LEAVES)
    assert jax.tree.structure(adapter.tree()) == jax.tree.structure(tree)
    opt = optax.adamw(1e-2, weight_decay=0.5)
    state = opt.init(adapter.trainable)
    moments = len(jax.tree.leaves(state[0].mu))
    assert moments == len(jax.tree.leaves(adapter.trainable)) < len(jax.tree.leaves(tree))
    # the scales stay per module, the joined tree is what the decoder reads
    assert np.asarray(join(adapter.trainable, adapter.frozen)["attn"]["v_proj"]["s"]).max() > 1.0
    assert np.asarray(lora_scale(model.config, lc)).shape == (model.config.num_layers,)


def _train_losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _old_layout(run, step: int, cfg, total_steps: int) -> dict:
    """A step's state as checkpoints held it before the split: AdamW's state over the joined tree, its
    moments for the frozen leaves zero (their gradient always was)."""
    raw = ocp.PyTreeCheckpointer().restore(run / "checkpoints" / str(step) / "state")
    optimizer, _ = make_optimizer(cfg.train, total_steps)
    trainable = Adapter.split(raw["lora"]).trainable
    like = {"lora": raw["lora"], "opt_state": optimizer.init(trainable), "rng": raw["rng"]}
    saved, _ = Checkpointer(run / "checkpoints", keep=3).restore(step, like)
    new = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved["opt_state"])}
    old = optimizer.init(jax.tree.map(np.asarray, saved["lora"]))
    paths, treedef = jax.tree_util.tree_flatten_with_path(old)
    assert len(paths) > len(new) and all(jax.tree_util.keystr(p) in {*new, *_fixed(paths)} for p, _ in paths)
    leaves = [new.get(jax.tree_util.keystr(p), np.zeros_like(x)) for p, x in paths]
    return {**saved, "opt_state": jax.tree_util.tree_unflatten(treedef, leaves)}


def _fixed(paths) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in paths if getattr(p[-1], "key", None) in FIXED_LEAVES}


def test_checkpoint_written_before_the_split_resumes_exactly(assets, tmp_path):
    over = {"train.max_steps": 4, "checkpoint.every_steps": 2, "lora.target_modules": ["q_proj", "v_proj",
            "down_proj"]}  # fmt: skip
    raw = tiny_config(assets, tmp_path / "straight", **over)
    raw["lora"].update(PATTERNS)
    straight = train(config_from_dict(raw)).output_dir
    # the same run stopped at step 2, its checkpoint rewritten in the old layout, then resumed
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in ("2", "4"):
        shutil.rmtree(resumed / "checkpoints" / step)
    shutil.rmtree(resumed / "adapter")
    cfg = config_from_dict({**raw, "output_dir": str(resumed)})
    ckpt = Checkpointer(resumed / "checkpoints", keep=3)
    meta = Checkpointer(straight / "checkpoints", keep=3).read_meta(2)
    old = _old_layout(straight, 2, cfg, 4)
    ckpt.save(2, old, meta)
    ckpt.close()
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text(
        "".join(ln + "\n" for ln in lines if json.loads(ln).get("step", 0) <= 2)
    )
    train(cfg, resume=True)
    want, got = _train_losses(straight), _train_losses(resumed)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (got, want)
    a = (straight / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (resumed / "adapter" / "adapter_model.safetensors").read_bytes()
