"""How many parameters an adapter trains, counted as PEFT counts them (`get_nb_trainable_parameters`).

The LoRA tree is not PEFT's set of tensors one for one: its layers are stacked, so a layer left out by
`layers_to_transform` keeps (unused) slots, and with `rank_pattern` every layer of a module holds the
module's largest rank, zero-padded. PEFT creates only the adapted layers, each at its own rank. So the
count is read from the `Layout` for the linear modules, and from the tree for the rest:

    linear module, per adapted layer i   r_i * (in + out)   lora_A [r_i, in], lora_B [out, r_i]
                                         + out              DoRA's lora_magnitude_vector
                                         + out              lora_bias: lora_B.bias
    MoE weight (target_parameters)       (E *) r * (in + out) per layer, every layer (its A and B as held)
    trainable tokens                     k * D              trainable_tokens_delta (tied: shared, once)
    modules_to_save                      V * D per copy     (tied: one copy, PEFT's ensure_weight_tying)
"""

import math

import jax
import numpy as np

from jaxlora.lora.adapters import layout
from jaxlora.lora.config import LoraConfig
from jaxlora.lora.tokens import MODULES, TOKENS
from jaxlora.lora.trainable import Adapter
from jaxlora.models.config import DecoderConfig


def peft_trainable_count(cfg: DecoderConfig, lora_cfg: LoraConfig, tree: dict) -> int:
    """PEFT's trainable parameter count for `lora_cfg` on model `cfg`; `tree` is the run's LoRA tree
    (`init_lora`'s, or its `jax.eval_shape`: only shapes and leaf names are read)."""
    lay = layout(cfg, lora_cfg)
    total = 0
    for m in lay.modules:
        leaf = tree[m.key[0]][m.key[1]]
        per_layer = m.in_features + m.out_features
        extra = m.out_features * (("m" in leaf) + ("bias" in leaf))
        adapted = [i for i in np.flatnonzero(lay.mask) if i in m.layers]
        total += sum(int(lay.ranks[m.key][i]) * per_layer + extra for i in adapted)
    for target, _, _ in lay.params:
        leaf = tree[target.key[0]][target.key[1]]
        total += _size(leaf["a"]) + _size(leaf["b"])
    trainable = Adapter.split(tree).trainable
    for key in (TOKENS, MODULES):
        total += sum(_size(x) for x in jax.tree.leaves(trainable.get(key, {})))
    return total


def _size(x) -> int:
    return math.prod(x.shape)
