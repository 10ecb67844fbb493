"""The embedding side of a PEFT adapter file: trainable token rows, modules_to_save copies, and the grown
embedding layers of a resized vocabulary, as PEFT writes them (`embedding_tensors`) and reads them
(`read_embeddings`), in the LoRA tree's extra entries (`jaxlora.lora.tokens`).

    trainable tokens    E.token_adapter.trainable_tokens_delta [k, D] (the rows themselves), and
                        adapter_config.json trainable_token_indices: [ids]
    modules_to_save     E.weight [V, D] and lm_head.weight [V, D], full copies (tied: the one copy under
                        both names, with ensure_weight_tying where PEFT can tie: embed_tokens, not wte)

(`E` the embedding module, e.g. `model.embed_tokens`; all names under `base_model.model.`.) When tokens were
added to the tokenizer and the embedding resized, PEFT's `save_pretrained` (its
`save_embedding_layers="auto"`) also writes the input embedding and the LM head whole, and
`from_pretrained` loads them over the base's (the base must have been resized to the same size first).
Their names follow the wrapper the module sits in:

    plain LoRA             E.weight                           lm_head.weight
    trainable tokens       E.token_adapter.base_layer.weight  lm_head.weight
                           (tied: lm_head.token_adapter.base_layer.weight and .trainable_tokens_delta)
    modules_to_save of X   X.original_module.weight, and X.modules_to_save.weight beside the copy X.weight
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.lora.tokens import (
    MODULES,
    RESIZED,
    TOKENS,
    check_indices,
    embed_module,
    peft_module_key,
    peft_tokens_key,
    saved_modules,
)
from jaxlora.models.config import DecoderConfig

_P = "base_model.model."


def _names(cfg: DecoderConfig, lora: dict | None, conf: dict | None = None) -> dict[str, str]:
    """{"embed": the base embedding's key, "lm_head": the base LM head's key} for this adapter's wrappers
    (from the tree when writing, from adapter_config.json when reading)."""
    if conf is not None:  # names checked by `read_embeddings`
        names = conf.get("modules_to_save")
        copied = set(saved_modules(cfg, names)) if names else set()
        tokens = bool(conf.get("trainable_token_indices"))
    else:
        copied, tokens = set((lora or {}).get(MODULES, {})), TOKENS in (lora or {})
    if cfg.tie_word_embeddings and copied:  # the one tied copy stands for both
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


def _resized_tensors(cfg: DecoderConfig, lora: dict) -> dict[str, np.ndarray]:
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


def _read_resized(conf: dict, cfg: DecoderConfig, st, weights) -> tuple[dict | None, set[str]]:
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


def embedding_tensors(cfg: DecoderConfig, lora: dict) -> tuple[dict[str, np.ndarray], dict]:
    """(the tensors of the tree's extra entries, float32 in torch layout; the adapter_config.json keys they
    set). `lora` on the host."""
    tensors, config = {}, {}
    tokens, copies = lora.get(TOKENS), lora.get(MODULES)
    if tokens is not None:  # the rows themselves, as PEFT's trainable_tokens_delta [k, D]
        tensors[peft_tokens_key(cfg)] = np.asarray(tokens["rows"], np.float32)
        config["trainable_token_indices"] = [int(i) for i in np.asarray(tokens["token_ids"])]
    if copies:  # full copies, torch layout [V, D]; tied: the one copy under both names, as PEFT saves it
        names = {"embed": embed_module(cfg).rsplit(".", 1)[-1], "lm_head": "lm_head"}
        for key, value in copies.items():
            tensors[peft_module_key(cfg, key)] = np.asarray(value if key == "embed" else value.T, np.float32)
        if cfg.tie_word_embeddings:
            tensors[peft_module_key(cfg, "lm_head")] = tensors[peft_module_key(cfg, "embed")]
            if embed_module(cfg).endswith("embed_tokens"):  # PEFT ties only these names (not GPT-2's wte)
                config["ensure_weight_tying"] = True
        config["modules_to_save"] = [names[k] for k in copies]
    tensors.update(_resized_tensors(cfg, lora))
    return tensors, config


def read_embeddings(conf: dict, cfg: DecoderConfig, st, weights: Path) -> tuple[dict, set[str]]:
    """(the tree's extra entries found in an adapter file: {"embed": ..., "modules_to_save": ...,
    "resized_vocab": ...} as present, jax arrays; the tensor names they account for). UserError (one line)
    for a missing tensor or a shape this model (with the file's own vocabulary, if resized) cannot take."""
    config_path = weights.parent / "adapter_config.json"
    try:
        saved_modules(cfg, conf.get("modules_to_save") or ())  # unknown names: one line, naming the file
    except UserError as err:
        raise UserError(f"{config_path}: {str(err).removeprefix('lora.')}") from None
    resized, used = _read_resized(conf, cfg, st, weights)
    if resized is not None:  # ids and copies follow the file's vocabulary
        cfg = dataclasses.replace(cfg, vocab_size=resized["embed"].shape[0])
    out: dict = {}
    if resized is not None:
        out[RESIZED] = {k: jax.numpy.asarray(v) for k, v in resized.items()}
    copies = _read_copies(conf, cfg, st, weights)
    if copies is not None:
        out[MODULES] = copies
        names = (peft_module_key(cfg, "embed"), peft_module_key(cfg, "lm_head"))
        used |= {k for k in names if k in st.names()}
    token_ids = conf.get("trainable_token_indices")
    if token_ids:
        try:
            token_ids = check_indices(cfg, token_ids)
        except UserError as err:
            raise UserError(f"{config_path}: {str(err).removeprefix('lora.')}") from None
        key = peft_tokens_key(cfg)
        if key not in st.names():
            raise UserError(f"{weights}: tensor {key} is missing (trainable_token_indices is set)")
        want = (len(token_ids), cfg.hidden_size)
        if tuple(st.shape(key)) != want:
            raise UserError(
                f"{weights}: tensor {key} has shape {list(st.shape(key))} but this model needs {list(want)}"
            )
        out[TOKENS] = {
            "rows": jax.numpy.asarray(np.asarray(st.get(key), np.float32)),
            "token_ids": jax.numpy.asarray(np.asarray(token_ids, np.float32)),
        }
        used.add(key)
    return out, used


def _read_copies(conf: dict, cfg: DecoderConfig, st, weights: Path) -> dict | None:
    """The modules_to_save copies of the adapter file, as {"embed": [V, D], "lm_head": [D, V]}, or None."""
    names = conf.get("modules_to_save")
    if not names:
        return None
    keys = saved_modules(cfg, names)  # checked by `read_embeddings`
    out: dict = {}
    for key in keys:
        name = peft_module_key(cfg, key)
        if name not in st.names():
            raise UserError(f"{weights}: tensor {name} is missing (modules_to_save {names})")
        want = (cfg.vocab_size, cfg.hidden_size)
        if tuple(st.shape(name)) != want:
            raise UserError(
                f"{weights}: tensor {name} has shape {list(st.shape(name))}, this model needs {list(want)}"
            )
        value = np.asarray(st.get(name), np.float32)
        out[key] = jax.numpy.asarray(value if key == "embed" else value.T)
    head = peft_module_key(cfg, "lm_head")
    if (
        cfg.tie_word_embeddings
        and head in st.names()
        and not np.array_equal(st.get(head), np.asarray(out["embed"]))
    ):
        raise UserError(
            f"{weights}: separate embed_tokens and lm_head copies on a model with tied embeddings; jaxlora "
            "keeps them tied (PEFT's ensure_weight_tying=True)"
        )
    return out
