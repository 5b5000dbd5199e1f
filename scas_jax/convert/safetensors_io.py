"""Minimal safetensors reading (memory-mapped) and streaming writing, bfloat16 included.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the end of
the header), then the raw little-endian bytes. Reading maps the file and returns
zero-copy views; writing streams one tensor at a time, so neither side ever holds a
second copy of the model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from scas_jax.errors import ScasError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` is a zero-copy numpy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                self.header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ScasError(f"{self.path}: not a safetensors file ({e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = 8 + n
        self.metadata = self.header.pop("__metadata__", {}) or {}

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ScasError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dt = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dt.itemsize
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._base + begin)
        return arr.reshape(info["shape"])


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: dict | None = None,
) -> None:
    """Write tensors given as ``(name, shape, dtype, load)``; ``load()`` is called one
    tensor at a time while streaming, so at most one tensor is materialised."""
    items = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in items:
        dt = np.dtype(dtype)
        if dt not in _NAMES:
            raise ScasError(f"cannot write tensor {name!r} of dtype {dt} to safetensors")
        nbytes = int(np.prod(shape)) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, load in items:
            arr = np.ascontiguousarray(load(), dtype=np.dtype(dtype).newbyteorder("<"))
            if tuple(arr.shape) != tuple(shape):
                raise ScasError(f"tensor {name!r}: shape {arr.shape} differs from declared {shape}")
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
