"""edge's native helper (nested.c), built at install time and loaded with ctypes.

``nested_to_q4_1`` is None when the library was not built (no C compiler at install); callers
then use the numpy implementation of the same computation (edge/quant/nested.py)."""

from __future__ import annotations

import ctypes
from pathlib import Path


def _load():
    for path in sorted(Path(__file__).parent.glob("_nested*.so")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        fn = lib.edge_nested_to_q4_1
        p = ctypes.c_void_p
        fn.argtypes = [p, p, ctypes.c_int64, ctypes.c_int, p, p, p]
        fn.restype = ctypes.c_int
        return fn
    return None


nested_to_q4_1 = _load()
