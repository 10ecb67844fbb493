"""The training state: what a checkpoint holds and each step advances.

`TrainState` is the adapter (`jaxlora.lora.Adapter`: its trainable and frozen leaves) and the optimizer
state of its trainable half (on the devices, as the plan placed them), the
run's PRNG key and the number of steps done; a DPO run against its initial adapter also keeps that frozen
adapter (`reference`, not checkpointed: it is read from `lora.init_from`, on resume too). Step `i` draws
its dropout key as `fold_in(key, i)`, so the key never changes and a resumed run draws the same masks as
one that was never stopped.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jaxlora.config import Config
from jaxlora.data import BatchLoader
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig, init_lora, lora_scale, unmerge
from jaxlora.lora.pissa import is_base_changing
from jaxlora.lora.tokens import RESIZED, layer_groups
from jaxlora.models.config import DecoderConfig
from jaxlora.parallel import Plan
from jaxlora.peft import load_peft_adapter
from jaxlora.train.checkpoint import Checkpointer, restore_lora, rng_to_array


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The LoRA being trained and where the run stands."""

    adapter: Adapter  # trainable: {group: {module: {"a": [L, in, r], "b": [L, r, out]}}}; frozen: scales, ids
    opt_state: Any  # the optimizer's state of `adapter.trainable`
    rng: np.ndarray  # the run's key as raw uint32 data (host), as checkpoints hold it
    step: int = 0  # steps done
    reference: dict | None = None  # DPO's frozen reference adapter (prefs.reference: initial_adapter),
    # a joined LoRA tree placed in buffers of its own (the train step donates the adapter's); else None

    def arrays(self) -> dict:
        """What a checkpoint saves (the step and the data position go in its metadata): the joined LoRA
        tree, as checkpoints have always held it."""
        return {"lora": self.adapter.tree(), "opt_state": self.opt_state, "rng": self.rng}


def build_state(
    cfg: Config,
    model: DecoderConfig,
    optimizer: optax.GradientTransformation,
    plan: Plan,
    ckpt: Checkpointer,
    loader: BatchLoader,
    resuming: bool,
    base_params: dict | None = None,
) -> TrainState:
    """A fresh LoRA (B = 0) and optimizer state placed by `plan`, or with `resuming` the latest checkpoint
    read into those shardings (whatever the mesh of the run that saved it), `loader` moved to its data
    position. `base_params` (the frozen weights) are needed by `lora.use_dora` (magnitudes = ||W||).
    A fresh run with `lora.init_from` starts from that adapter instead (`load_init_from`), read once: a
    DPO run with `prefs.reference: initial_adapter` keeps it as the `reference` (resuming, it is read
    from `lora.init_from` again: the checkpoint holds the trained adapter, not the initial one)."""
    key = jax.random.key(cfg.seed)
    lora = init_lora(model, cfg.lora, jax.random.fold_in(key, 1), params=base_params)
    initial = None
    if cfg.lora.init_from is not None and (not resuming or _wants_reference(cfg)):
        initial = load_init_from(cfg.lora, model, lora)
    reference = None
    if _wants_reference(cfg):  # a host copy placed apart: `lora`'s buffers are donated by the train step
        reference = plan.place(jax.tree.map(np.array, initial), plan.lora_shardings(initial))
    if initial is not None and not resuming:
        lora = initial
    adapter, opt_state = plan.place_train_state(Adapter.split(lora), optimizer.init)
    state = TrainState(adapter, opt_state, rng_to_array(key), reference=reference)
    if not resuming:
        return state
    step = ckpt.latest_step()
    saved, meta = _restore(ckpt, step, state, optimizer, plan)  # target shardings: this plan's
    loader.restore(meta["data"])
    adapter = Adapter.split(saved["lora"])
    return TrainState(adapter, saved["opt_state"], np.asarray(saved["rng"]), step, reference)


def _restore(ckpt: Checkpointer, step: int, state: TrainState, optimizer, plan: Plan) -> tuple[dict, dict]:
    """`ckpt.restore` into `state`'s arrays; a checkpoint whose optimizer state also covers the adapter's
    frozen leaves (written before they left the optimizer) is read with that layout, then those
    moments are dropped: they never moved a weight, so the run resumes exactly."""
    try:
        return ckpt.restore(step, state.arrays())
    except UserError:
        if not state.adapter.frozen:
            raise
    joined = state.adapter.tree()
    old = plan.like_shardings(jax.eval_shape(optimizer.init, joined), joined, plan.lora_shardings(joined))
    like = {
        **state.arrays(),
        "opt_state": jax.tree.map(_with_sharding, jax.eval_shape(optimizer.init, joined), old),
    }
    saved, meta = ckpt.restore(step, like)
    by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved["opt_state"])}
    want, treedef = jax.tree_util.tree_flatten_with_path(state.opt_state)
    opt_state = jax.tree_util.tree_unflatten(treedef, [by_path[jax.tree_util.keystr(p)] for p, _ in want])
    return {**saved, "opt_state": opt_state}, meta


def _with_sharding(x: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _wants_reference(cfg: Config) -> bool:
    """Whether the run is DPO against its frozen initial adapter (the config checks `lora.init_from`)."""
    return cfg.train.objective == "dpo" and cfg.prefs.reference == "initial_adapter"


def load_init_from(lora_cfg: LoraConfig, model: DecoderConfig, fresh: dict) -> dict:
    """The adapter `lora.init_from` names, as a tree like `fresh` (this run's own init: same leaves, shapes
    and dtypes). A PEFT adapter folder, or a jaxlora run folder: its latest checkpoint, else its adapter/.
    Its r, alpha and targets must be the run's (UserError naming the mismatch)."""
    where = Path(lora_cfg.init_from).expanduser()
    what = f"lora.init_from {lora_cfg.init_from}"
    run_cfg = where / "config.yaml"
    if (where / "adapter_config.json").is_file() or not run_cfg.is_file():
        tree, got = load_peft_adapter(where, model)  # a UserError names a folder that is no adapter
        r, alpha = got.r, got.alpha
    else:  # a run folder
        saved = yaml.safe_load(run_cfg.read_text()).get("lora") or {}
        r, alpha = saved.get("r", LoraConfig().r), saved.get("alpha", LoraConfig().alpha)
        if (where / "checkpoints").is_dir() and any((where / "checkpoints").iterdir()):
            tree, _ = restore_lora(where / "checkpoints")
        elif (where / "adapter").is_dir():
            tree, _ = load_peft_adapter(where / "adapter", model)
        else:
            raise UserError(f"{what}: the run folder has no checkpoint and no adapter/ yet")
    resized = tree.pop(RESIZED, None)  # the grown embedding layers of an adapter trained with added tokens
    if resized is not None and resized["embed"].shape[0] != model.vocab_size:
        raise UserError(
            f"{what}: the adapter is for a vocabulary of {resized['embed'].shape[0]} tokens (tokens were "
            f"added in its training), this run's has {model.vocab_size}; set data.add_special_tokens to them"
        )
    if r != lora_cfg.r or float(alpha) != float(lora_cfg.alpha):
        raise UserError(
            f"{what}: the adapter has r={r}, alpha={alpha} but this run has lora.r={lora_cfg.r}, "
            f"lora.alpha={lora_cfg.alpha}; set them to the adapter's"
        )
    want, got = _leaf_shapes(fresh), _leaf_shapes(tree)
    if want.keys() != got.keys():
        only_run, only_adapter = sorted(want.keys() - got.keys())[:4], sorted(got.keys() - want.keys())[:4]
        raise UserError(
            f"{what}: the adapter's targets differ from this run's lora.target_modules (only in the run: "
            f"{only_run}, only in the adapter: {only_adapter}); "
            "set lora.target_modules (and layers_to_transform) to the adapter's"
        )
    for name, shape in want.items():
        if got[name] != shape:
            raise UserError(f"{what}: {name} has shape {list(got[name])}, this run needs {list(shape)}")
    return jax.tree.map(lambda f, x: jnp.asarray(x, f.dtype), fresh, tree)


def _leaf_shapes(tree: dict) -> dict[str, tuple]:
    leaves = jax.tree.leaves_with_path(tree)
    return {"/".join(str(k.key) for k in path): tuple(np.shape(x)) for path, x in leaves}


def initial_adapter(cfg: Config, model: DecoderConfig, base_params: dict) -> dict | None:
    """The step-0 adapter of a PiSSA/OLoRA run (`lora.init` pissa*, olora), the one `build_state` starts
    from (same key), computed from the ORIGINAL base weights; None for other inits. Keep it: the base to
    train on is `residual_base(...)` and the export needs it (`save_peft_adapter(initial_lora=...)`)."""
    if not is_base_changing(cfg.lora.init):
        return None
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    return init_lora(model, cfg.lora, key, params=base_params)


def residual_base(base_params: dict, initial: dict, cfg: Config, model: DecoderConfig) -> dict:
    """The base with the initial PiSSA/OLoRA update taken out (`W - scale * A0 @ B0`, as PEFT does)."""
    return unmerge(base_params, layer_groups(initial), lora_scale(model, cfg.lora))


def save_state(ckpt: Checkpointer, state: TrainState, loader: BatchLoader) -> None:
    """Checkpoint `state` with the data position of `loader` (a collective: every process calls it)."""
    ckpt.save(state.step, state.arrays(), {"step": state.step, "data": loader.state()})
