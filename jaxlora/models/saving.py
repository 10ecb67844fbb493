"""Write a parameter tree as a Hugging Face checkpoint folder: the mirror of `loading.py`.

Every tensor of the family's spec (`models.spec.name_table`) goes out under its HF name and layout (torch
`Linear` weights transposed back to [out, in], GPT-2 Conv1D kept [in, out]); quantized kernels are
dequantized, so the result is a plain float model transformers loads. Tensors are produced one layer at a
time on the host and written shard by shard (shards planned by `huggingface_hub`), so host memory peaks at
one shard. config.json, generation_config.json and the tokenizer files are copied from the source folder.
For the text tower of a multimodal checkpoint, the vision and audio towers and the projectors are copied
through from the source unchanged, so transformers loads the result as the source's class.

A write that runs out of space (a full disk, a quota, a file size limit) becomes `DiskFull`, one line that
the command lines print with exit code 1; checkpoints and adapters raise it too.
"""

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory

from jaxlora.errors import UserError
from jaxlora.models.checkpoint_names import other_tower_names, text_tower_names, tower_name
from jaxlora.models.config import DecoderConfig, read_hf_config
from jaxlora.models.loading import DTYPES, resolve_model_path
from jaxlora.models.safetensors_io import CheckpointReader, write_safetensors
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
)
from jaxlora.quant import QuantizedTensor, dequantize

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# (entry, layer, kernel [in, out] float32 on the host) -> the kernel to write, for per-layer LoRA targets.
KernelHook = Callable[[Entry, int, np.ndarray], np.ndarray]
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: past a file size limit (RLIMIT_FSIZE)
# the same, as tensorstore (under orbax) words them
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "os_error_code='28'")


class DiskFull(Exception):
    """A write ran out of space: `what` was being written to `folder` and needs about `needed` bytes;
    `then` says what is intact and what to do. Its text is one line."""

    def __init__(self, what: str, folder, needed: int, then: str = ""):
        super().__init__(what, str(folder), needed, then)
        self.what, self.folder, self.needed, self.then = what, Path(folder), int(needed), then

    def __str__(self) -> str:
        size = about_bytes(self.needed)
        return f"disk full while {self.what} to {self.folder} (it needs about {size}){self.then}"

    def said(self, what: str | None = None, then: str = "") -> "DiskFull":
        """The same failure, worded by a caller that knows more (the step, what is intact)."""
        return DiskFull(what or self.what, self.folder, self.needed, then or self.then)


def out_of_space(err: BaseException | None) -> bool:
    """Whether `err` (or an error it was raised from) is a write that ran out of space."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def about_bytes(n: int) -> str:
    """`n` bytes for a person: 512 bytes, 3.4 kB, 1.2 MB, 5.0 GB."""
    if n < 1000:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # unreachable


def check_out_dir(out_dir, overwrite: bool) -> Path:
    """Refuse an `out_dir` that is a file, or a non-empty folder unless `overwrite`; creates nothing
    (an export checks it before loading any weights)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} already exists and is not empty; "
            "pass overwrite=True (--overwrite) to write into it"
        )
    return out


def prepare_out_dir(out_dir, overwrite: bool) -> Path:
    """Create `out_dir`; refuse a non-empty folder (or a file) unless `overwrite`."""
    out = check_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _host_f32(leaf) -> np.ndarray:
    """A float32 host copy of a dense or quantized (dequantized) leaf."""
    if isinstance(leaf, QuantizedTensor):
        leaf = dequantize(leaf, np.float32)
    return np.asarray(jax.device_get(leaf), np.float32)


def _tensors(params: dict, cfg: DecoderConfig, np_dtype, hook: KernelHook | None) -> dict:
    """{HF name: (bytes, producer)} for every tensor, in spec order; a producer returns the HF array."""
    itemsize = np.dtype(np_dtype).itemsize
    out = {}
    for entry in name_table(cfg):
        leaf, shape = entry.get(params), hf_shape(entry, cfg)
        hooked = hook is not None and entry.per_layer and entry.layout in (LINEAR, CONV1D, EXPERTS)
        if entry.layout == EXPERTS and entry.parts:
            out.update(_expert_tensors(leaf, entry, cfg, np_dtype, hook if hooked else None))
            continue

        def produce(row, layer, leaf=leaf, entry=entry, shape=shape, hooked=hooked):  # row: in the stack
            arr = _host_f32(leaf if row is None else jax.tree.map(lambda x: x[row], leaf))
            if hooked:
                arr = hook(entry, layer, arr)
            arr = arr.T if entry.layout == LINEAR else arr
            arr = arr.transpose(0, 2, 1) if entry.layout == EXPERTS else arr  # fused (Gemma 4): [E, out, in]
            arr = arr.T[:, None] if entry.layout == DEPTHWISE else arr  # [W, C] -> [C, 1, W]
            assert arr.shape == shape, (entry.hf_name(layer), arr.shape, shape)
            return np.ascontiguousarray(arr.astype(np_dtype))

        for row, i in enumerate(layer_ids(entry, cfg)) if entry.per_layer else [(None, None)]:
            out[entry.hf_name(i)] = (int(np.prod(shape)) * itemsize, lambda p=produce, r=row, i=i: p(r, i))
    return out


def _expert_tensors(leaf, entry: Entry, cfg: DecoderConfig, np_dtype, hook: KernelHook | None) -> dict:
    """An EXPERTS entry written in the hub's per-expert layout (what transformers' save_pretrained
    writes): one [out_part, in] tensor per expert and part. One layer [E, in, out] is kept on the host
    while its tensors are written (the hook, a LoRA merge, sees the whole layer)."""
    shape = part_shape(entry, cfg)
    held: dict = {}

    def layer_kernels(i):
        if i not in held:
            held.clear()
            arr = _host_f32(jax.tree.map(lambda x: x[i], leaf))  # [E, in, out]
            held[i] = hook(entry, i, arr) if hook is not None else arr
        return held[i]

    def produce(i, j, k):
        arr = layer_kernels(i)[j, :, k * shape[0] : (k + 1) * shape[0]].T  # [out_part, in]
        return np.ascontiguousarray(arr.astype(np_dtype))

    nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    return {
        part.format(i=i, j=j): (nbytes, lambda i=i, j=j, k=k: produce(i, j, k))
        for i in range(cfg.num_layers)
        for j in range(cfg.num_experts)
        for k, part in enumerate(entry.parts)
    }


def source_dtype(folder: Path) -> str:
    """The dtype a checkpoint folder's config.json declares (float32 when absent or unknown)."""
    conf = read_hf_config(folder)
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def save_pretrained(
    out_dir,
    params: dict,
    cfg: DecoderConfig,
    source,
    *,
    dtype: str | None = None,
    tokenizer_src=None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    kernel_hook: KernelHook | None = None,
) -> Path:
    """Write `params` (model `cfg`, loaded from folder `source`) as a HF checkpoint folder; return it.

    `dtype`: float32, bfloat16 or float16; default the source config.json's. `kernel_hook` may rewrite each
    LoRA-targetable kernel layer before it is written (a LoRA merge does). An existing non-empty `out_dir`
    is refused unless `overwrite`. Shards above `max_shard_bytes` get a `model.safetensors.index.json`.
    `DiskFull` when the space runs out (the shards written so far are removed). The text tower of a
    multimodal checkpoint is written with the rest of `source` (`_with_other_towers`), for its class.
    """
    source = Path(source)
    dtype = dtype or source_dtype(source)
    if dtype not in DTYPES:
        raise UserError(f"merged dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tok_src = Path(tokenizer_src) if tokenizer_src is not None else source
    if not tok_src.is_dir():
        tok_src = resolve_model_path(str(tokenizer_src))
    out = prepare_out_dir(out_dir, overwrite)

    tensors = _tensors(params, cfg, DTYPES[dtype], kernel_hook)
    if cfg.text_tower_of:
        tensors = _with_other_towers(tensors, source)
    try:
        _write_shards(out, tensors, max_shard_bytes)
        _write_configs(out, source, tok_src, dtype, cfg.vocab_size)
    except OSError as err:
        if not out_of_space(err):
            raise
        for partial in out.glob("model*.safetensors*"):  # free what was written
            partial.unlink()
        raise DiskFull("writing the merged model", out, sum(t[0] for t in tensors.values())) from None
    return out


def _with_other_towers(tensors: dict, source: Path) -> dict:
    """A multimodal checkpoint's tensors ({name: (bytes, produce)}): the text tower's `tensors` under the
    names `source` gives them, and its other towers (vision, audio, projectors) as they are there, byte for
    byte, read through a memory map when their shard is written."""
    reader = CheckpointReader(source)
    names = text_tower_names(reader.names())
    out = {names.get(n, tower_name(n)): t for n, t in tensors.items()}
    for name in other_tower_names(reader.names()):
        out[name] = (int(reader.get(name).nbytes), lambda name=name: reader.get(name))
    return out


def _write_shards(out: Path, tensors: dict, max_shard_bytes: int) -> None:
    """The safetensors files of `tensors` ({name: (bytes, produce)}), replacing any there, and the index
    when they need more than one shard."""
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda item: item[0],
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    for fname, names in split.filename_to_tensors.items():
        write_safetensors(out / fname, {n: tensors[n][1]() for n in names}, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_configs(out: Path, source: Path, tok_src: Path, dtype: str, vocab_size: int) -> None:
    """config.json (the source's, with the written dtype, no quantization and the vocabulary's size; in a
    multimodal one's text_config too), generation_config.json and the tokenizer files beside the weights."""
    conf = read_hf_config(source)
    conf.pop("quantization_config", None)
    for part in (conf, conf.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in part:
                part[key] = dtype
        if part.get("vocab_size") not in (None, vocab_size):  # tokens were added
            part["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copyfile(tok_src / name, out / name)
