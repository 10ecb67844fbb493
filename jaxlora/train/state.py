"""The training state: what a checkpoint holds and each step advances.

`TrainState` is the LoRA tree and its optimizer state (on the devices, as the plan placed them), the
run's PRNG key and the number of steps done. Step `i` draws its dropout key as `fold_in(key, i)`, so the
key never changes and a resumed run draws the same masks as one that was never stopped.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from jaxlora.config import Config
from jaxlora.data import BatchLoader
from jaxlora.lora import init_lora, lora_scale, unmerge
from jaxlora.lora.pissa import is_base_changing
from jaxlora.lora.tokens import EXTRA_KEYS
from jaxlora.models.config import DecoderConfig
from jaxlora.parallel import Plan
from jaxlora.train.checkpoint import Checkpointer, rng_to_array


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The LoRA being trained and where the run stands."""

    lora: dict  # {group: {module: {"a": [L, in, r], "b": [L, r, out]}}}
    opt_state: Any  # the optimizer's state of `lora`
    rng: np.ndarray  # the run's key as raw uint32 data (host), as checkpoints hold it
    step: int = 0  # steps done

    def arrays(self) -> dict:
        """What a checkpoint saves (the step and the data position go in its metadata)."""
        return {"lora": self.lora, "opt_state": self.opt_state, "rng": self.rng}


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
    position. `base_params` (the frozen weights) are needed by `lora.use_dora` (magnitudes = ||W||)."""
    key = jax.random.key(cfg.seed)
    lora = init_lora(model, cfg.lora, jax.random.fold_in(key, 1), params=base_params)
    lora, opt_state = plan.place_train_state(lora, optimizer.init)
    state = TrainState(lora, opt_state, rng_to_array(key))
    if not resuming:
        return state
    step = ckpt.latest_step()
    saved, meta = ckpt.restore(step, state.arrays())  # target shardings: this plan's
    loader.restore(meta["data"])
    return TrainState(saved["lora"], saved["opt_state"], np.asarray(saved["rng"]), step)


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
    layers_only = {k: v for k, v in initial.items() if k not in EXTRA_KEYS}
    return unmerge(base_params, layers_only, lora_scale(model, cfg.lora))


def save_state(ckpt: Checkpointer, state: TrainState, loader: BatchLoader) -> None:
    """Checkpoint `state` with the data position of `loader` (a collective: every process calls it)."""
    ckpt.save(state.step, state.arrays(), {"step": state.step, "data": loader.state()})
