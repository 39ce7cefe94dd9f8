"""Rewriting a GGUF file tensor by tensor, metadata kept: dequantizing to F32, swapping weights.

Used by bench/bitstack_gemma.py to turn the Q4_K_M Gemma 3 270M into the F32 common starting
point and to write models whose linear weights are BitStack reconstructions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

# What a tensor becomes: a float32 array (numpy order, as the reader gives it) or raw quantized
# bytes with their GGML type (a reader tensor's ``data`` and ``tensor_type``).
Replacement = tuple[np.ndarray, "object | None"]

SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


def dequantized(t) -> np.ndarray:
    """A reader tensor as float32 in numpy order ([rows, cols] for a matrix)."""
    from gguf.quants import dequantize

    return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def rewrite_gguf(src: Path, dst: Path, tensor: Callable[[object], Replacement], *, file_type: int) -> None:
    """Write ``dst`` with every metadata key of ``src`` (file type replaced) and each tensor as
    ``tensor(reader_tensor)`` returns it. Written to a temporary name, then renamed."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_file_type(file_type)
    for t in reader.tensors:
        arr, raw = tensor(t)
        writer.add_tensor(t.name, arr, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def dequantize_gguf(src: Path, dst: Path) -> None:
    """Every tensor of ``src`` as F32 (``general.file_type`` = ALL_F32)."""
    rewrite_gguf(src, dst, lambda t: (dequantized(t), None), file_type=0)
