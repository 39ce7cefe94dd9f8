"""Safetensors files read lazily: headers validated against file sizes, tensors memory-mapped.

The safetensors package has no numpy bfloat16, and real MoE checkpoints are mostly BF16, so
tensors are mapped from the validated header offsets here and widened to float32 on access.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ModelFormatError

_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one file's header; a truncated or corrupted file raises ModelFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path.name} is not a safetensors file: {size} bytes, header needs 8")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(_MAX_HEADER, size - 8):
            raise ModelFormatError(
                f"{path.name} is truncated or not safetensors: header claims {hlen:,} bytes, file has {size:,}")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path.name} has a corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path.name} has a corrupted safetensors header (not a JSON object)")
    base = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path.name}: malformed header entry for {name}") from None
        if dtype not in _DTYPES:
            raise ModelFormatError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != want:
            raise ModelFormatError(f"{path.name}: tensor {name} spans {end - begin} bytes, shape needs {want}")
        infos[name] = TensorInfo(path, dtype, shape, base + begin, want)
        data_end = max(data_end, end)
    if base + data_end > size:
        raise ModelFormatError(
            f"{path.name} is truncated: its header describes {base + data_end:,} bytes, the file has {size:,}")
    return infos


def load(info: TensorInfo, dtype=np.float32, *, copy: bool = True) -> np.ndarray:
    """Map one tensor and convert it to ``dtype`` (BF16 widened exactly to float32). With
    ``copy=False`` a tensor already of ``dtype`` is returned as a read-only memory map."""
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
    raw = mm.view(_DTYPES[info.dtype]).reshape(info.shape)
    if not copy and raw.dtype == dtype:
        return raw
    if info.dtype == "BF16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
        return out if dtype == np.float32 else out.astype(dtype)
    return np.array(raw, dtype=dtype)


def load_rows(info: TensorInfo, first: int, count: int, dtype=np.float32) -> np.ndarray:
    """Rows ``first .. first + count`` of a tensor's leading axis, converted to ``dtype``: one
    expert of a fused [E, ...] tensor without mapping the rest."""
    if not 0 <= first <= first + count <= info.shape[0]:
        raise ModelFormatError(f"{info.file.name}: rows {first}..{first + count} outside a tensor of {info.shape[0]}")
    row = info.nbytes // info.shape[0]
    part = TensorInfo(info.file, info.dtype, (count, *info.shape[1:]), info.start + first * row, count * row)
    return load(part, dtype)
