"""A resized vocabulary in a PEFT adapter file: the base's grown embedding layers, as PEFT writes them.

When tokens were added to the tokenizer and the embedding resized, PEFT's `save_pretrained` (its
`save_embedding_layers="auto"`) writes the input embedding and the LM head whole, and `from_pretrained`
loads them over the base's (the base must have been resized to the same size first). Their names follow
the wrapper the module sits in (`E` the embedding module, e.g. `model.embed_tokens`; all under
`base_model.model.`):

    plain LoRA             E.weight                           lm_head.weight
    trainable tokens       E.token_adapter.base_layer.weight  lm_head.weight
                           (tied: lm_head.token_adapter.base_layer.weight and .trainable_tokens_delta)
    modules_to_save of X   X.original_module.weight, and X.modules_to_save.weight beside the copy X.weight

jaxlora writes the same names (`resized_tensors`) and reads them back (`read_resized`) into the LoRA
tree's `resized_vocab` entry (`jaxlora.lora.tokens`), torch layout [V', D] in the file.
"""

import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.tokens import MODULES, RESIZED, TOKENS, embed_module
from jaxlora.models.config import DecoderConfig

_P = "base_model.model."


def _names(cfg: DecoderConfig, lora: dict | None, conf: dict | None = None) -> dict[str, str]:
    """{"embed": the base embedding's key, "lm_head": the base LM head's key} for this adapter's wrappers
    (from the tree when writing, from adapter_config.json when reading)."""
    if conf is not None:
        copies = set(conf.get("modules_to_save") or ())
        tokens = bool(conf.get("trainable_token_indices"))
        copied = {k for k, names in (("embed", ("embed_tokens", "wte")), ("lm_head", ("lm_head",)))
                  if copies & set(names)}  # fmt: skip
        if cfg.tie_word_embeddings and copied:
            copied = {"embed", "lm_head"}
    else:
        copied, tokens = set((lora or {}).get(MODULES, {})), TOKENS in (lora or {})
        if cfg.tie_word_embeddings and copied:
            copied = {"embed", "lm_head"}
    out = {}
    for key, module in (("embed", embed_module(cfg)), ("lm_head", "lm_head")):
        if key in copied:
            out[key] = f"{_P}{module}.original_module.weight"
        elif tokens and (key == "embed" or cfg.tie_word_embeddings):
            out[key] = f"{_P}{module}.token_adapter.base_layer.weight"
        else:
            out[key] = f"{_P}{module}.weight"
    return out


def resized_tensors(cfg: DecoderConfig, lora: dict) -> dict[str, np.ndarray]:
    """The tensors PEFT writes for the tree's `resized_vocab` entry (none without one), float32."""
    resized = lora.get(RESIZED)
    if not resized:
        return {}
    names = _names(cfg, lora)
    embed = np.asarray(resized["embed"], np.float32)  # [V', D]
    head = embed if cfg.tie_word_embeddings else np.asarray(resized["lm_head"], np.float32).T  # [V', D]
    out = {names["embed"]: embed, names["lm_head"]: head}
    copies = lora.get(MODULES, {})
    for key, module in (("embed", embed_module(cfg)), ("lm_head", "lm_head")):
        copy = copies.get("embed" if cfg.tie_word_embeddings else key)
        if copy is not None:
            value = np.asarray(copy, np.float32)  # the embedding [V', D], or the LM head [D, V']
            untied_head = key == "lm_head" and not cfg.tie_word_embeddings
            out[f"{_P}{module}.modules_to_save.weight"] = value.T if untied_head else value
    if TOKENS in lora and cfg.tie_word_embeddings:
        rows = np.asarray(lora[TOKENS]["rows"], np.float32)  # [k, D], tied to the head as PEFT ties them
        out[f"{_P}lm_head.token_adapter.trainable_tokens_delta"] = rows
    return out


def read_resized(conf: dict, cfg: DecoderConfig, st, weights) -> tuple[dict | None, set[str]]:
    """(the `resized_vocab` entry {"embed": [V', D], "lm_head": [D, V']} of an adapter file, or None;
    the keys it accounts for). The embedding may have any number of rows: it replaces the base's."""
    names = _names(cfg, None, conf)
    if names["embed"] not in st.names():
        return None, set()
    embed = np.asarray(st.get(names["embed"]), np.float32)
    if embed.ndim != 2 or embed.shape[1] != cfg.hidden_size:
        raise UserError(
            f"{weights}: tensor {names['embed']} has shape {list(embed.shape)}, this model needs "
            f"[vocabulary, {cfg.hidden_size}]"
        )
    entry, used = {"embed": embed}, {names["embed"]}
    module = embed_module(cfg)
    extra = [
        names["lm_head"],
        f"{_P}{module}.modules_to_save.weight",
        f"{_P}lm_head.modules_to_save.weight",
        f"{_P}lm_head.token_adapter.trainable_tokens_delta",
    ]
    used |= {k for k in extra if k in st.names()}
    if not cfg.tie_word_embeddings:
        if names["lm_head"] not in st.names():
            raise UserError(
                f"{weights}: tensor {names['lm_head']} is missing: the file resizes the embedding to "
                f"{embed.shape[0]} tokens, and an untied LM head must come with it"
            )
        head = np.asarray(st.get(names["lm_head"]), np.float32)
        if head.shape != embed.shape:
            raise UserError(
                f"{weights}: tensor {names['lm_head']} has shape {list(head.shape)}, the embedding "
                f"{list(embed.shape)}"
            )
        entry["lm_head"] = np.ascontiguousarray(head.T)  # [D, V']
    return entry, used
