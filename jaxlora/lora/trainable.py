"""What of an adapter trains and what stays fixed: `Adapter(trainable, frozen)`.

A LoRA tree (`init_lora`, `load_peft_adapter`, checkpoints, the PEFT writer) holds, next to the weights
that train ("a", "b", DoRA's "m", lora_bias's "bias", token rows, modules_to_save copies), leaves that
never do:

    lora[group][name]["s"]       [L] float32   per-module scale factor (rank/alpha patterns, MoE weights)
    lora["embed"]["token_ids"]   [k]           the trainable-token ids (`jaxlora.lora.tokens`)
    lora["resized_vocab"]        {...}         a grown vocabulary's frozen embedding layers

`Adapter.split` puts them in `frozen`, so only `trainable` reaches `jax.grad` and the optimizer: AdamW
keeps no moments for them and its weight decay cannot move them. `Adapter.tree()` joins both halves back
into the one tree that the decoder, checkpoints and the PEFT writer read. The split works on any tree of
that shape (arrays, abstract arrays, shardings), so the plan places and compiles an `Adapter` as it is.
The token ids stay float32, the format checkpoints have always held them in.
"""

import dataclasses

import jax

from jaxlora.lora.tokens import RESIZED

FIXED_LEAVES = ("s", "token_ids")  # leaf names that never train
FIXED_GROUPS = (RESIZED,)  # top-level entries that never train


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """The adapter being trained, in two trees shaped like the LoRA tree (each holds only its leaves)."""

    trainable: dict  # what `grad` and the optimizer see
    frozen: dict  # FIXED_LEAVES and FIXED_GROUPS; {} for a plain LoRA

    @classmethod
    def split(cls, tree: dict) -> "Adapter":
        """Split a LoRA tree (its token ids float or int) into its trainable and frozen halves."""
        trainable, frozen = {}, {}
        for group, sub in tree.items():
            if group in FIXED_GROUPS:
                frozen[group] = sub
                continue
            train, fixed = _split_group(sub)
            if train:
                trainable[group] = train
            if fixed:
                frozen[group] = fixed
        return cls(trainable, frozen)

    def tree(self) -> dict:
        """The joined LoRA tree."""
        return join(self.trainable, self.frozen)


def _split_group(sub: dict) -> tuple[dict, dict]:
    """(trainable, frozen) of one top-level entry: {name: {leaf: array}} or {leaf: array}."""
    train, fixed = {}, {}
    for name, leaf in sub.items():
        if isinstance(leaf, dict):
            t = {k: v for k, v in leaf.items() if k not in FIXED_LEAVES}
            f = {k: v for k, v in leaf.items() if k in FIXED_LEAVES}
            if t:
                train[name] = t
            if f:
                fixed[name] = f
        elif name in FIXED_LEAVES:
            fixed[name] = leaf
        else:
            train[name] = leaf
    return train, fixed


def join(trainable: dict, frozen: dict) -> dict:
    """The two halves merged key by key (the inverse of `Adapter.split`, token ids as they are)."""
    out = dict(trainable)
    for key, value in frozen.items():
        if key in out and isinstance(value, dict):
            out[key] = join(out[key], value)
        else:
            out[key] = value
    return out
