"""Read safetensors files tensor by tensor through a memory map, without torch.

The format is an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}`, then the raw bytes. Mapping the file means only the tensor being
converted is ever paged in; bfloat16 comes through `ml_dtypes`. The header is checked before anything
is mapped or allocated (its length against the file's size, then each tensor's dtype, shape and offsets),
so a truncated or corrupt file gives one line naming the file and the tensor.

`CheckpointReader` also reads MXFP4 checkpoints (gpt-oss): a pair `X_blocks` / `X_scales` is seen as the
one tensor `X`, dequantized to float32 when it is read (`jaxlora.quant.mxfp4`), one tensor at a time;
`packed(X)` gives the pair itself, memory-mapped (the `mxfp4` base keeps it as it is).
"""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlora.errors import UserError
from jaxlora.quant.mxfp4 import dequantize_mxfp4, mxfp4_shape

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One `.safetensors` file: `names()`, `shape(name)` and `get(name)` (a zero-copy view)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if size < 8:
                self._bad(f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:  # checked before reading: a garbage length would allocate terabytes
                self._bad(f"its header claims {n} bytes but the file has {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._bad("bad header")
        if not isinstance(header, dict):
            self._bad("bad header")
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        for name, info in header.items():
            self._check(name, info, size - self.data_start)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _bad(self, why: str):
        raise UserError(f"{self.path}: not a valid safetensors file ({why}); download or save it again")

    def _check(self, name: str, info, data_size: int) -> None:
        """Dtype, shape and offsets of one header entry, against the bytes the file holds."""
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            self._bad(f"tensor {name}: header entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            self._bad(f"tensor {name}: bad shape {shape!r}")
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1]:
            self._bad(f"tensor {name}: bad data_offsets {offsets!r}")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != need:
            self._bad(f"tensor {name}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} ({need})")
        if offsets[1] > data_size:
            raise UserError(
                f"{self.path}: tensor {name} ends at byte {offsets[1]} of the data but the file holds "
                f"{data_size}; the file is truncated, download or save it again"
            )

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        raw = self._map[self.data_start + start : self.data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class CheckpointReader:
    """All tensors of a checkpoint folder: `model.safetensors` or a sharded index."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{index}: not a valid index (no JSON weight_map); download it again"
                ) from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise UserError(
                    f"{folder}: weight files listed in {index.name} are missing: {', '.join(missing)}"
                )
            files = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single.is_file():
            st = SafetensorsFile(single)
            self._where = {name: st for name in st.names()}
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json found")
        self.folder = folder
        self._packed = self._mxfp4_pairs()

    def _mxfp4_pairs(self) -> dict[str, tuple]:
        """X -> ((file, X_blocks), (file, X_scales)) for each uint8 MXFP4 pair whose X is not stored
        itself; the pair's two names are replaced by X in `names()`. Shapes are checked here, before any
        read."""
        packed = {}
        for name in list(self._where):
            x = name.removesuffix("_blocks")
            scales = x + "_scales"
            if x == name or scales not in self._where or x in self._where:
                continue
            pair = ((self._where[name], name), (self._where[scales], scales))
            if any(f.header[n]["dtype"] != "U8" for f, n in pair):
                continue
            try:
                mxfp4_shape(pair[0][0].shape(name), pair[1][0].shape(scales), x)
            except UserError as err:
                raise UserError(f"{self.folder}: {err}") from None
            packed[x] = pair
        for (_, blocks), (_, scales) in packed.values():
            del self._where[blocks], self._where[scales]
        return packed

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._packed

    def names(self) -> list[str]:
        return [*self._where, *self._packed]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._packed:
            (fb, blocks), (fs, scales) = self._packed[name]
            return mxfp4_shape(fb.shape(blocks), fs.shape(scales), name)
        return self._where[name].shape(name)

    def packed(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The uint8 (blocks [*P, R, G, 16], scales [*P, R, G]) of an MXFP4 tensor, memory-mapped; None
        for a tensor stored otherwise."""
        if name not in self._packed:
            return None
        (fb, blocks), (fs, scales) = self._packed[name]
        return fb.get(blocks), fs.get(scales)

    def get(self, name: str) -> np.ndarray:
        """One tensor; an MXFP4 one dequantized to float32 (`quant.mxfp4.dequantize_mxfp4`)."""
        if name in self._packed:
            (fb, blocks), (fs, scales) = self._packed[name]
            return dequantize_mxfp4(fb.get(blocks), fs.get(scales), name)
        return self._where[name].get(name)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write numpy arrays (float32, bfloat16, ...) as one safetensors file, one tensor at a time."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset = {}, 0
    for name, arr in tensors.items():
        size = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
