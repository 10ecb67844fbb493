"""`CausalLM`: a Flax NNX module over the functional decoder, for users who work with NNX.

The base weights live in `FrozenWeight` variables and the adapters in `LoraWeight` variables. Neither is
an `nnx.Param`, so a filter always says which one it means:

    from jaxlora.nnx import CausalLM, LoraWeight

    model = CausalLM.from_pretrained("../shared/assets/models/stories260K")
    model.add_lora(LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")), seed=0)
    logits = model(input_ids)                                    # [B, T, V] float32
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoraWeight))(model, batch)

The training core (`jaxlora.train`) uses the same two trees as plain pytrees.

Where it sits: a module of its own at the package root, above `jaxlora.lora` in the layers (pyproject's
import-linter contract) and beside `jaxlora.peft`. It is a facade over the decoder (`jaxlora.models`)
that attaches adapters (`jaxlora.lora`), so it cannot live in `models/`, which LoRA builds on; nothing
below it needs it, and it needs neither the PEFT files, the data nor the training loop.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.lora import init_lora, lora_scale
from jaxlora.models.config import DecoderConfig
from jaxlora.models.decoder import forward
from jaxlora.models.loading import Model, load_model


class FrozenWeight(nnx.Variable):
    """A frozen base weight (float or quantized leaf)."""


class LoraWeight(nnx.Variable):
    """A trainable LoRA factor (A [L, in, r] or B [L, r, out], float32)."""


def _values(tree):
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


class CausalLM(nnx.Module):
    """A decoder LM as an NNX module: `base` (FrozenWeight) and optional `lora` (LoraWeight) trees."""

    def __init__(self, config: DecoderConfig, params: dict, name_or_path: str = ""):
        self.config = config
        self.name_or_path = name_or_path
        self.base = nnx.data(jax.tree.map(FrozenWeight, params))
        self.lora = nnx.data(None)
        self.lora_scale = nnx.data(None)
        self.lora_dropout = 0.0

    @classmethod
    def from_pretrained(cls, name_or_path, **load_kw) -> "CausalLM":
        """Load a HF checkpoint (see `load_model` for the options) as a module."""
        m: Model = load_model(name_or_path, **load_kw)
        return cls(m.config, m.params, m.name_or_path)

    def add_lora(self, lora_cfg, seed: int = 0, lora: dict | None = None) -> None:
        """Attach adapters: freshly initialized as PEFT does, or the given tree (e.g. an imported one)."""
        tree = lora if lora is not None else init_lora(self.config, lora_cfg, jax.random.key(seed))
        self.lora = nnx.data(jax.tree.map(LoraWeight, tree))
        self.lora_scale = nnx.data(jnp.asarray(lora_scale(self.config, lora_cfg)))
        self.lora_dropout = float(lora_cfg.dropout)

    def params(self) -> tuple[dict, dict | None]:
        """The plain (base, lora) pytrees for the functional API."""
        return _values(self.base), (_values(self.lora) if self.lora is not None else None)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, dropout_rng=None):
        """Logits [B, T, V] float32 for input_ids [B, T] (see `jaxlora.models.forward`)."""
        base, lora = self.params()
        return forward(
            base,
            self.config,
            input_ids,
            positions,
            segment_ids,
            lora=lora,
            lora_scale=self.lora_scale if lora is not None else 1.0,
            lora_dropout=self.lora_dropout,
            dropout_rng=dropout_rng,
        )
