"""Minimal safetensors reading (memory-mapped) and streaming writing, bfloat16 included.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the end of
the header), then the raw little-endian bytes. Reading maps the file and returns
zero-copy views; writing streams one tensor at a time, so neither side ever holds a
second copy of the model.
"""

from __future__ import annotations

import json
import math
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


MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` is a zero-copy numpy view.

    The whole layout is checked on open, so a truncated or corrupted file is a
    :class:`ScasError` naming the file (and tensor) rather than a wrong array or a crash:
    the header length against the file size (and at most ``MAX_HEADER_BYTES``), the JSON,
    each tensor's dtype, shape and ``data_offsets`` (``prod(shape) * itemsize`` bytes,
    inside the data section, no two overlapping), and that the tensors cover the data
    section exactly.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ScasError(f"{self.path}: not a safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ScasError(
                    f"{self.path}: header length {n} exceeds "
                    + (f"the file ({size} bytes)" if n <= MAX_HEADER_BYTES
                       else f"the {MAX_HEADER_BYTES}-byte limit")
                    + "; truncated or not a safetensors file"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ScasError(f"{self.path}: header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise ScasError(f"{self.path}: header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self._base = 8 + n
            self._entries = self._check_entries(header, size - self._base)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_entries(self, header: dict, data_len: int) -> dict[str, tuple[np.dtype, tuple, int, int]]:
        """``{name: (dtype, shape, begin, end)}`` after checking each entry and the layout."""
        entries = {}
        for name, info in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(info, dict):
                raise ScasError(f"{where}: header entry is not an object")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dtype not in _DTYPES:
                raise ScasError(f"{where}: unsupported dtype {dtype!r} "
                                f"(supported: {', '.join(_DTYPES)})")
            if not (isinstance(shape, list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise ScasError(f"{where}: shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise ScasError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
            begin, end = offsets
            dt = _DTYPES[dtype]
            nbytes = math.prod(shape) * dt.itemsize
            if end - begin != nbytes:
                raise ScasError(
                    f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                    f"{dtype} shape {shape} needs {nbytes}"
                )
            if end > data_len:
                raise ScasError(
                    f"{where}: data_offsets [{begin}, {end}] run past the data section "
                    f"({data_len} bytes); truncated file?"
                )
            entries[name] = (dt, tuple(shape), begin, end)
        pos, prev = 0, None
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
            if begin < pos:
                raise ScasError(f"{self.path}: tensors {prev!r} and {name!r} overlap")
            if begin > pos:
                raise ScasError(f"{self.path}: {begin - pos} unused bytes before tensor {name!r}")
            pos, prev = end, name
        if pos != data_len:
            raise ScasError(
                f"{self.path}: the tensors cover {pos} bytes but the data section holds {data_len}"
            )
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only view of the mapped file."""
        if name not in self._entries:
            raise ScasError(f"{self.path}: no tensor {name!r}")
        dt, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dt)
        arr = np.frombuffer(self._mm, dtype=dt, count=(end - begin) // dt.itemsize,
                            offset=self._base + begin)
        return arr.reshape(shape)


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
