"""Load a Hugging Face checkpoint (local folder or hub id) into a jaxlora `Model`.

Tensors go from the memory-mapped safetensors straight into JAX arrays in the requested dtype, one
parameter at a time: per-layer tensors are stacked into one preallocated host buffer that is freed as
soon as it is on the device, so host memory never holds two copies of the weights. An MXFP4 checkpoint
(gpt-oss) reads the same way: the reader (`safetensors_io`) dequantizes each `X_blocks` / `X_scales` pair
to float32 as that one tensor of one layer is read, and `quant.weights` then applies as to any float weight;
with `quant.weights: mxfp4` a pair whose blocks run along the kernel's `in` (gpt-oss's experts, stored
[E, in, out]) is kept as it is instead (`_quantize_layer`).
"""

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlora.errors import UserError
from jaxlora.models.checkpoint_names import text_tower_names, unexpected_tensors
from jaxlora.models.config import DecoderConfig, ModelSource, read_source
from jaxlora.models.random_weights import init_params
from jaxlora.models.safetensors_io import CheckpointReader
from jaxlora.models.spec import (
    CONV1D,
    DEPTHWISE,
    EXPERTS,
    LINEAR,
    Entry,
    hf_shape,
    layer_ids,
    name_table,
    part_shape,
    quantized,
)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Quantizer hook: (HF tensor name, `{i}` for the layer; one layer [in, out] as a float32 host array) -> leaf
# to store, or None to keep. An optional `wants(name) -> bool` method lets the loader skip a tensor before
# reading it as float32.
Quantizer = Callable[[str, np.ndarray], Any]


@dataclasses.dataclass
class Model:
    """A loaded decoder: its `config`, its parameter pytree and the folder it came from."""

    config: DecoderConfig
    params: dict
    path: Path
    name_or_path: str = ""


def resolve_model_path(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded with huggingface_hub (clear error offline)."""
    p = Path(os.path.expanduser(name_or_path))
    if p.is_dir():
        return p
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or not _HUB_ID.match(name_or_path)
    if looks_local:
        raise UserError(f"model folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name_or_path,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as err:  # offline, unknown repo, gated, ...
        kind = type(err).__name__
        raise UserError(
            f"could not download model {name_or_path!r} from the Hugging Face hub ({kind}); "
            "check the id and your connection, or pass a local folder"
        ) from None
    return Path(folder)


def model_source(name_or_path: str | Path, revision: str | None = None) -> ModelSource:
    """The model folder (a hub id downloaded) and its config.json, read once (`config.ModelSource`)."""
    return read_source(resolve_model_path(str(name_or_path), revision), str(name_or_path))


def _check_pickle_only(folder: Path, allow_pickle: bool) -> bool:
    has_st = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    has_bin = (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file()
    if not has_st and has_bin and not allow_pickle:
        raise UserError(
            f"{folder}: only a pickle checkpoint (pytorch_model.bin) is present; pickle can run code, so it "
            "is refused. Convert it to safetensors, or opt in with model.allow_pickle: true"
        )
    return not has_st and has_bin


class _PickleReader:
    """Opt-in reader for `pytorch_model.bin` (needs torch)."""

    def __init__(self, folder: Path):
        import torch

        self.tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        self.folder = folder

    def __contains__(self, name):
        return name in self.tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name].float().numpy()


class _TextTowerReader:
    """A multimodal checkpoint seen as its text tower: the spec's names, the vision tensors left out."""

    def __init__(self, reader):
        self.reader, self.folder = reader, reader.folder
        self.map = text_tower_names(reader.names())

    def __contains__(self, name):
        return name in self.map

    def names(self):
        return list(self.map)

    def shape(self, name):
        return self.reader.shape(self.map[name])

    def get(self, name):
        return self.reader.get(self.map[name])


def _to_jax_layout(arr: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.layout == DEPTHWISE:  # [C, 1, W] -> [W, C]
        return arr[:, 0].T
    return arr.T if entry.layout == LINEAR else arr


def _read_checked(reader, name: str, want: tuple[int, ...]) -> np.ndarray:
    got = reader.shape(name)
    if tuple(got) != want:
        raise UserError(f"tensor {name} has shape {list(got)}, expected {list(want)} from config.json")
    return reader.get(name)


def _read_experts(reader, entry: Entry, cfg: DecoderConfig, layer: int) -> np.ndarray:
    """One layer's experts [E, in, out], from the fused tensor or from the hub's per-expert tensors."""
    name = entry.hf_name(layer)
    if name in reader:  # transformers 5's fused [E, out, in]
        return _read_checked(reader, name, hf_shape(entry, cfg)).transpose(0, 2, 1)
    first = entry.parts[0].format(i=layer, j=0)
    if first not in reader:
        raise UserError(f"checkpoint is missing tensor {first} (or the fused {name})")
    want = part_shape(entry, cfg)
    out = np.empty(entry.shape(cfg), np.float32)
    for j in range(cfg.num_experts):
        for k, part in enumerate(entry.parts):  # [out_part, in] each, side by side along out
            arr = _read_checked(reader, part.format(i=layer, j=j), want)
            out[j, :, k * want[0] : (k + 1) * want[0]] = arr.T
    return out


def _read_entry(reader, entry: Entry, cfg: DecoderConfig, layer: int | None) -> np.ndarray:
    if entry.layout == EXPERTS:
        return _read_experts(reader, entry, cfg, layer)
    name = entry.hf_name(layer)
    if name not in reader and entry.alias and entry.alias.format(i=layer) in reader:
        name = entry.alias.format(i=layer)
    if name not in reader:
        # Tied checkpoints sometimes carry lm_head too; untied ones must have it.
        raise UserError(f"checkpoint is missing tensor {name}")
    return _to_jax_layout(_read_checked(reader, name, hf_shape(entry, cfg)), entry)


def load_params(
    reader, cfg: DecoderConfig, dtype: str = "float32", quantizer: Quantizer | None = None
) -> dict:
    """Build the parameter pytree from a checkpoint reader, one parameter at a time.

    Every tensor of the checkpoint must be a weight of the spec (or a known buffer): a leftover means the
    config.json does not describe these weights, and is refused before anything is read.
    """
    _check_consumed(reader, cfg)
    np_dtype = DTYPES[dtype]
    params: dict = {}
    for entry in name_table(cfg):
        quantize = quantizer is not None and quantized(entry)
        if quantize and hasattr(quantizer, "wants"):  # skip before making a float32 copy
            quantize = quantizer.wants(entry.hf)
        leaf = None
        if entry.per_layer:
            if quantize:
                leaf = _load_quantized_stack(reader, entry, cfg, quantizer)
            if leaf is None:
                leaf = _load_stack(reader, entry, cfg, np_dtype)
        else:
            host = _read_entry(reader, entry, cfg, None)
            if quantize:
                leaf = quantizer(entry.hf, _host_f32(host))
            if leaf is None:
                leaf = jnp.asarray(host.astype(np_dtype))
        entry.put(params, leaf)
    return params


def _check_consumed(reader, cfg: DecoderConfig) -> None:
    left = unexpected_tensors(cfg, reader.names())
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise UserError(
            f"{reader.folder}: {len(left)} checkpoint {'tensor is' if len(left) == 1 else 'tensors are'} "
            f"no weight of this {cfg.model_type} model "
            f"({cfg.num_layers} layers per config.json): {shown}; does config.json belong to these weights?"
        )


def _load_stack(reader, entry: Entry, cfg: DecoderConfig, np_dtype) -> jax.Array:
    """Fill one preallocated [L, ...] host buffer layer by layer ([L_kind, ...] for a hybrid model's mixer
    weight: the layers of its kind), then move it to the device."""
    ids = layer_ids(entry, cfg)
    first = _read_entry(reader, entry, cfg, ids[0])
    buf = np.empty((len(ids), *first.shape), np_dtype)
    buf[0] = first  # read once: an MXFP4 tensor is dequantized on every read
    del first
    for row, i in enumerate(ids[1:], 1):
        buf[row] = _read_entry(reader, entry, cfg, i)
    return jnp.asarray(buf)


def _load_quantized_stack(reader, entry: Entry, cfg: DecoderConfig, quantizer: Quantizer):
    """Quantize layer by layer into preallocated [L, ...] host leaves, so host memory holds one float32
    layer plus one quantized stack; each leaf is freed once it is on the device.

    Returns None when the quantizer skips this tensor.
    """
    stack, ids = None, layer_ids(entry, cfg)
    for row, i in enumerate(ids):
        q = _quantize_layer(reader, entry, cfg, i, quantizer)
        if q is None:
            return None
        if stack is None:
            stack = jax.tree.map(lambda a: np.empty((len(ids), *a.shape), a.dtype), q)
        leaves, treedef = jax.tree.flatten(q)
        assert treedef == jax.tree.structure(stack), f"layer {i} of {entry.hf} quantized differently"
        for buf, a in zip(jax.tree.leaves(stack), leaves, strict=True):
            buf[row] = a
    return jax.tree.map(jnp.asarray, stack)


def _quantize_layer(reader, entry: Entry, cfg: DecoderConfig, layer: int, quantizer: Quantizer):
    """One layer's quantized leaf: an MXFP4 pair kept bit for bit when the quantizer keeps MXFP4
    (`WeightQuantizer.keeps_mxfp4`) and the HF tensor is the kernel without a transpose (CONV1D, so the
    blocks run along `in`); otherwise the float32 tensor through the quantizer."""
    name = entry.hf_name(layer)
    pair = reader.packed(name) if hasattr(reader, "packed") and entry.layout == CONV1D else None
    if pair is not None and getattr(quantizer, "keeps_mxfp4", lambda _: False)(entry.hf):
        got, want = reader.shape(name), hf_shape(entry, cfg)
        if tuple(got) != want:
            raise UserError(f"tensor {name} has shape {list(got)}, expected {list(want)} from config.json")
        return quantizer.from_mxfp4(entry.hf, *pair)
    return quantizer(entry.hf, _host_f32(_read_entry(reader, entry, cfg, layer)))


def _host_f32(arr: np.ndarray) -> np.ndarray:
    """One C-contiguous float32 copy of a (possibly transposed, memory-mapped) tensor."""
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_model(
    name_or_path: str | Path | ModelSource,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    attention: str = "auto",
    remat: str = "lean",
    revision: str | None = None,
    allow_pickle: bool = False,
    quantizer: Quantizer | None = None,
    random_init_seed: int | None = None,
) -> Model:
    """Load a HF decoder checkpoint (folder or hub id, or a `ModelSource` already read) as a `Model`.

    dtype: parameter storage (`float32` or `bfloat16`); compute_dtype defaults to it. `quantizer`
    (see `jaxlora.quant`) turns linear kernels into quantized tensors while loading. With
    `random_init_seed`, only `config.json` is read and the weights are random (see `models.random_weights`).
    """
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = name_or_path if isinstance(name_or_path, ModelSource) else model_source(name_or_path, revision)
    folder, name = source.folder, source.name
    cfg = source.config.with_runtime(compute_dtype=compute_dtype or dtype, attention=attention, remat=remat)
    if random_init_seed is not None:
        params = init_params(cfg, random_init_seed, dtype)
        if quantizer is not None:
            params = quantize_loaded(params, cfg, quantizer)
        return Model(cfg, params, folder, name)
    reader = _PickleReader(folder) if _check_pickle_only(folder, allow_pickle) else CheckpointReader(folder)
    if cfg.text_tower_of:
        reader = _TextTowerReader(reader)
    params = load_params(reader, cfg, dtype, quantizer)
    return Model(cfg, params, folder, name)


def quantize_loaded(params: dict, cfg: DecoderConfig, quantizer: Quantizer) -> dict:
    """Quantize the linear kernels of an in-memory parameter tree, layer by layer."""
    for entry in name_table(cfg):
        if not quantized(entry):
            continue
        w = entry.get(params)
        if entry.per_layer:
            parts = [quantizer(entry.hf, np.asarray(row, np.float32)) for row in w]
            if parts[0] is not None:
                entry.put(params, jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *parts))
        else:
            q = quantizer(entry.hf, np.asarray(w, np.float32))
            if q is not None:
                entry.put(params, q)
    return params


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside the model, through transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
