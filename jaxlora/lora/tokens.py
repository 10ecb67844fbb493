"""Training embeddings and the LM head, two PEFT ways, in the LoRA tree next to the per-layer groups.

`trainable_token_indices`, PEFT's trainable tokens: only the input-embedding rows of chosen tokens train.

    lora["embed"] = {"rows": [k, D] float32 (trained), "token_ids": [k] float32 (frozen)}

`modules_to_save: [embed_tokens, lm_head]`: full trainable float32 copies, PEFT's `ModulesToSaveWrapper`.

    lora["modules_to_save"] = {"embed": [V, D], "lm_head": [D, V]}   (either or both)

With tied embeddings there is one copy, "embed", read by the LM head too (PEFT's `ensure_weight_tying`).

A vocabulary grown for added tokens (`data.add_special_tokens`, `models.vocab`): the base's grown embedding
layers, frozen, which PEFT's `save_embedding_layers` writes into an adapter file and loads over the base's.

    lora["resized_vocab"] = {"embed": [V', D], "lm_head": [D, V'] (untied only)}   (imported trees only)

PEFT's `TrainableTokensLayer` keeps the new rows themselves (its `trainable_tokens_delta` [k, D] is written
over the embedding with `index_copy`), and so does jaxlora: `with_embeddings` writes them into a copy of
`params["embed"]["embedding"]` before the forward pass, outside the decoder, so gradients reach those rows
only. With tied embeddings the LM head reads the same matrix, as PEFT ties its token adapters. The token ids
never train: `Adapter.split` (`jaxlora.lora.trainable`) keeps them, and `resized_vocab`, out of the gradient
and the optimizer. They stay float32 in the tree, the format checkpoints have always held them in.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.models.config import DecoderConfig
from jaxlora.models.spec import name_table
from jaxlora.quant import as_kernel

TOKENS = "embed"
MODULES = "modules_to_save"
RESIZED = "resized_vocab"
EXTRA_KEYS = (TOKENS, MODULES, RESIZED)  # top-level tree keys that are not per-layer groups
_EMBED_NAMES, _HEAD_NAMES = ("embed_tokens", "wte"), ("lm_head",)


def embed_module(cfg: DecoderConfig) -> str:
    """The HF name of the input embedding module, e.g. `model.embed_tokens` (GPT-2: `transformer.wte`)."""
    entry = next(e for e in name_table(cfg) if tuple(e.path) == ("embed", "embedding"))
    return entry.hf.removesuffix(".weight")


def peft_module_key(cfg: DecoderConfig, key: str) -> str:
    """PEFT's tensor name for a modules_to_save copy ("embed" or "lm_head"), torch layout [V, D]."""
    return f"base_model.model.{embed_module(cfg) if key == 'embed' else 'lm_head'}.weight"


def peft_tokens_key(cfg: DecoderConfig) -> str:
    """PEFT's tensor name for the trainable rows [k, D]."""
    return f"base_model.model.{embed_module(cfg)}.token_adapter.trainable_tokens_delta"


def check_indices(cfg: DecoderConfig, indices) -> list[int]:
    texts = [i for i in indices if isinstance(i, str)]
    if texts:
        raise UserError(
            f"lora.trainable_token_indices {texts}: token texts are turned into ids by the run's tokenizer "
            "(jaxlora train); pass token ids here"
        )
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < cfg.vocab_size]
    if bad or len(set(indices)) != len(indices):
        raise UserError(
            f"lora.trainable_token_indices {indices}: each must be a distinct token id in "
            f"0..{cfg.vocab_size - 1}" + (f" ({bad} are not)" if bad else " (there are repeats)")
        )
    return indices


def init_tokens(cfg: DecoderConfig, params: dict, indices) -> dict:
    """The tree entry for `indices`, starting from the base embedding's rows (PEFT's init)."""
    ids = np.asarray(check_indices(cfg, indices), np.int32)
    rows = jnp.asarray(params["embed"]["embedding"], jnp.float32)[ids]  # [k, D]
    return {"rows": rows, "token_ids": jnp.asarray(ids, jnp.float32)}


def saved_modules(cfg: DecoderConfig, names) -> tuple[str, ...]:
    """`modules_to_save` names -> the copies to train: ("embed",), ("lm_head",) or both; with tied
    embeddings always the one tied ("embed",). Anything else is a UserError."""
    names = [n.rsplit(".", 1)[-1] for n in names]
    bad = [n for n in names if n not in _EMBED_NAMES + _HEAD_NAMES]
    if bad:
        raise UserError(
            f"lora.modules_to_save {bad}: jaxlora trains full copies of the input embedding "
            f"({embed_module(cfg).rsplit('.', 1)[-1]}) and lm_head only"
        )
    keys = {"embed" if n in _EMBED_NAMES else "lm_head" for n in names}
    if cfg.tie_word_embeddings:
        return ("embed",)
    return tuple(k for k in ("embed", "lm_head") if k in keys)


def init_modules(cfg: DecoderConfig, params: dict, names) -> dict:
    """float32 copies of the base embedding [V, D] and/or LM head [D, V] (PEFT copies the module)."""
    out = {}
    for key in saved_modules(cfg, names):
        if key == "embed":
            out[key] = jnp.asarray(params["embed"]["embedding"], jnp.float32)
        else:
            out[key] = as_kernel(params["lm_head"]["kernel"], jnp.float32)
    return out


def resized_entry(params: dict, cfg: DecoderConfig) -> dict:
    """The `lora["resized_vocab"]` entry for base `params` whose vocabulary was grown: float32 copies of
    the embedding [V', D] and, untied, the LM head [D, V']."""
    out = {"embed": jnp.asarray(params["embed"]["embedding"], jnp.float32)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = as_kernel(params["lm_head"]["kernel"], jnp.float32)
    return out


def layer_groups(lora: dict) -> dict:
    """The per-layer groups of a LoRA tree ({group: {name: leaf}}), its embedding entries left out."""
    return {k: v for k, v in lora.items() if k not in EXTRA_KEYS}


def with_embeddings(params: dict, lora: dict | None) -> tuple[dict, dict | None]:
    """(params with the trained embedding copies and token rows written in, the LoRA tree without them);
    both as given when `lora` has neither. Call it before `forward` (the decoder scans `lora`)."""
    if not lora or not any(k in lora for k in EXTRA_KEYS):
        return params, lora
    params = dict(params)
    resized = lora.get(RESIZED, {})  # the base's grown layers replace its own
    if "embed" in resized:
        emb = params["embed"]["embedding"]
        params["embed"] = {**params["embed"], "embedding": resized["embed"].astype(emb.dtype)}
    if "lm_head" in resized:
        params["lm_head"] = {**params["lm_head"], "kernel": resized["lm_head"]}
    copies = lora.get(MODULES, {})
    if "embed" in copies:
        emb = params["embed"]["embedding"]
        params["embed"] = {**params["embed"], "embedding": copies["embed"].astype(emb.dtype)}
    if "lm_head" in copies:
        params["lm_head"] = {**params["lm_head"], "kernel": copies["lm_head"]}
    if TOKENS in lora:
        entry = lora[TOKENS]
        ids = jax.lax.stop_gradient(entry["token_ids"]).astype(jnp.int32)  # [k]
        emb = params["embed"]["embedding"]  # [V, D]
        emb = emb.at[ids].set(entry["rows"].astype(emb.dtype))
        params["embed"] = {**params["embed"], "embedding": emb}
    return params, layer_groups(lora)
