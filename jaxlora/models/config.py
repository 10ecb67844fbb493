"""A model folder's `config.json`, read once into a `ModelSource`: the folder, the file as written and the
`DecoderConfig` it describes (`config_from_hf`: transformers 4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters`, never a preset table).

The family's entry (`jaxlora.models.families`) says how its file is read; this module only dispatches on
`model_type`. `DecoderConfig` (`models.decoder_config`) and its `Runtime` (`models.runtime`) are also
named here, the one module to import them from above the model's own layers.
"""

import dataclasses
import json
from pathlib import Path

from jaxlora.errors import UserError
from jaxlora.models.decoder_config import DecoderConfig
from jaxlora.models.families import FAMILIES, SUPPORTED_MODEL_TYPES, TEXT_TOWERS
from jaxlora.models.layer_settings import eos_ids
from jaxlora.models.runtime import ATTENTION_IMPLS, LORA_PRODUCTS, MOE_IMPLS, REMAT_POLICIES, Runtime

__all__ = [
    "ATTENTION_IMPLS",
    "LORA_PRODUCTS",
    "MOE_IMPLS",
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "TEXT_TOWERS",
    "DecoderConfig",
    "ModelSource",
    "Runtime",
    "config_from_hf",
    "read_hf_config",
    "read_source",
]


def config_from_hf(hf: dict) -> DecoderConfig:
    """Map a Hugging Face `config.json` dict to a `DecoderConfig` (with the default `Runtime`)."""
    mt = hf.get("model_type")
    _check_quantization(hf)
    if mt in TEXT_TOWERS:
        return dataclasses.replace(config_from_hf(_text_config(hf)), text_tower_of=mt)
    if mt not in FAMILIES:
        supported = ", ".join((*SUPPORTED_MODEL_TYPES, *TEXT_TOWERS))
        raise UserError(f"config.json: model_type {mt!r} is not supported; supported: {supported}")
    return DecoderConfig(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **FAMILIES[mt].fields(hf),
    )


def _check_quantization(hf: dict) -> None:
    """A pre-quantized checkpoint loads only as MXFP4 (gpt-oss; its `X_blocks` / `X_scales` are kept with
    `quant.weights: mxfp4`, else dequantized by `safetensors_io`); other quant methods' tensors are not
    read, so they are refused."""
    qc = hf.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    if qc is not None and method != "mxfp4":
        raise UserError(
            f"config.json: quantization_config with quant_method {method!r} is not supported (only mxfp4 "
            "checkpoints load); use the unquantized checkpoint and quant.weights: int8, nf4 or mxfp4"
        )


def _text_config(hf: dict) -> dict:
    """The text tower's config of a multimodal config.json: `text_config` over the keys it may leave out
    (the rest: the family's defaults), with the token ids and embedding tying of the top level where it
    sets them."""
    mt = hf["model_type"]
    text = hf.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UserError(f"config.json: model_type {mt!r} needs a text_config with hidden_size")
    top = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
    top = {k: v for k, v in top.items() if v is not None}  # the top level decides these (as transformers)
    tower = TEXT_TOWERS[mt]
    return {**FAMILIES[tower].text_config_defaults, **text, **top, "model_type": tower}


def read_hf_config(folder: Path) -> dict:
    """Read `config.json` from a model folder, with a one-line error when it is missing or broken."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json found; is this a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSource:
    """A model folder with its `config.json` read once: what setup, the start-up checks and the loader
    share (`jaxlora.models.loading.model_source` resolves a hub id to the folder first)."""

    folder: Path
    hf: dict  # config.json as written
    config: DecoderConfig  # what it describes, with the default Runtime
    name: str = ""  # as the user gave it (hub id or path)


def read_source(folder: Path, name: str = "") -> ModelSource:
    """Read and check `folder/config.json` once."""
    hf = read_hf_config(folder)
    return ModelSource(Path(folder), hf, config_from_hf(hf), name or str(folder))
