"""Read safetensors files tensor by tensor through a memory map, without torch.

The format is an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}`, then the raw bytes. Mapping the file means only the tensor being
converted is ever paged in; bfloat16 comes through `ml_dtypes`.
"""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlora.errors import UserError

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
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{self.path}: not a valid safetensors file (bad header)") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
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
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single.is_file():
            st = SafetensorsFile(single)
            self._where = {name: st for name in st.names()}
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json found")
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
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
