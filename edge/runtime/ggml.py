"""ggml's CPU kernels through ctypes, from the libraries llama-cpp-python ships.

Only what the offload engine needs: weight tensors living in memory we own (so an expert can be
written, or read from disk, straight into kernel format), and small graphs of matmul / silu / mul
/ get_rows computed on the CPU backend. Tensor shapes follow ggml: ne0 is the contiguous (input)
dimension, so a PyTorch weight W [out, in] is a ggml tensor with ne0 = in, ne1 = out.

Weight types: every type in :data:`COMPUTABLE` — the float types and the quantizations published
GGUFs use — is computed by ggml's own CPU kernels (tests/test_ggml.py checks each against a numpy
product of its dequantized weights).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from edge._llamacpp import ggml_cpu, lib_dir

F32, F16, Q4_0, Q4_1, Q8_0, I32 = 0, 1, 2, 3, 8, 26  # enum ggml_type
# The weight types ggml's CPU backend multiplies and edge accepts in a GGUF: floats, the legacy
# and K quantizations, IQ4_NL/IQ4_XS and MXFP4 (gpt-oss). The 1-3-bit IQ and ternary types are
# left out: their quantizers need an importance matrix, so they are not tested here.
COMPUTABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4")


def type_id(name: str) -> int:
    from gguf.constants import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def type_name(gtype: int) -> str:
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(gtype).name


def block_bytes(gtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    with _lock:
        if not _libs:
            # libggml-base.so.0 / libggml-cpu.so.0: the sonames llama.cpp itself links to, so there is
            # one copy of ggml's global state in the process (docs: FACTS on llama-cpp-python).
            base = ctypes.CDLL(str(lib_dir() / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
            cpu = ggml_cpu()
            p, i64, sz, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
            sigs = {
                "ggml_init": ([_InitParams], p), "ggml_free": ([p], None),
                "ggml_new_tensor_1d": ([p, i32, i64], p), "ggml_new_tensor_2d": ([p, i32, i64, i64], p),
                "ggml_get_data": ([p], p), "ggml_nbytes": ([p], sz), "ggml_tensor_overhead": ([], sz),
                "ggml_graph_overhead": ([], sz), "ggml_mul_mat": ([p, p, p], p), "ggml_silu": ([p, p], p),
                "ggml_mul": ([p, p, p], p), "ggml_new_graph": ([p], p),
                "ggml_build_forward_expand": ([p, p], None),
                "ggml_quantize_chunk": ([i32, p, p, i64, i64, i64, p], sz),
                "ggml_row_size": ([i32, i64], sz), "ggml_get_rows": ([p, p, p], p),
            }
            for name, (args, res) in sigs.items():
                fn = getattr(base, name)
                fn.argtypes, fn.restype = args, res
            cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, i32]
            cpu.ggml_graph_compute_with_ctx.restype = i32
            cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
            cpu.ggml_cpu_init()
            _libs["base"], _libs["cpu"] = base, cpu
    return _libs["base"], _libs["cpu"]


def row_bytes(gtype: int, n: int) -> int:
    blk, nbytes = block_bytes(gtype)
    if n % blk:
        raise ValueError(f"row of {n} is not a multiple of the block size {blk}")
    return n // blk * nbytes


_DATA_OFFSET: list[int] = []  # offset of ggml_tensor.data, verified against ggml_get_data


def _data_offset() -> int:
    """Where ``data`` sits in struct ggml_tensor (248 in ggml.h of this era), checked on a real
    tensor so a layout change is caught instead of corrupting memory."""
    if not _DATA_OFFSET:
        base, _ = _load()
        mem = np.empty(base.ggml_tensor_overhead() + 1024, dtype=np.uint8)
        ctx = base.ggml_init(_InitParams(mem.nbytes, mem.ctypes.data, False))
        t = base.ggml_new_tensor_1d(ctx, F32, 16)
        want = base.ggml_get_data(t)
        for off in (248, *range(0, 512, 8)):
            if ctypes.c_void_p.from_address(t + off).value == want:
                _DATA_OFFSET.append(off)
                break
        base.ggml_free(ctx)
        if not _DATA_OFFSET:
            raise RuntimeError("cannot locate ggml_tensor.data in this ggml build")
    return _DATA_OFFSET[0]


class Weight:
    """A 2-D ggml tensor [rows, cols] whose bytes live in a numpy buffer: its own, or a slice of
    ``buffer`` (so several tensors can share one contiguous block, e.g. an expert's three matrices)."""

    def __init__(self, gtype: int, rows: int, cols: int, buffer: np.ndarray | None = None):
        base, _ = _load()
        self.gtype, self.rows, self.cols = gtype, rows, cols
        self.nbytes = row_bytes(gtype, cols) * rows
        overhead = base.ggml_tensor_overhead() + 256
        if buffer is None:
            self._mem = np.empty(self.nbytes + overhead, dtype=np.uint8)
            self._ctx = base.ggml_init(_InitParams(self._mem.nbytes, self._mem.ctypes.data, False))
            self.tensor = base.ggml_new_tensor_2d(self._ctx, gtype, cols, rows)
            at = base.ggml_get_data(self.tensor) - self._mem.ctypes.data
            self.data = self._mem[at : at + self.nbytes]  # a view: it keeps the memory alive
        else:
            self._mem = np.empty(overhead, dtype=np.uint8)  # tensor header only
            self._ctx = base.ggml_init(_InitParams(self._mem.nbytes, self._mem.ctypes.data, True))
            self.tensor = base.ggml_new_tensor_2d(self._ctx, gtype, cols, rows)
            self.point_at(buffer)

    def point_at(self, buffer: np.ndarray) -> None:
        """Make the tensor's data the first ``nbytes`` of ``buffer`` (which the caller keeps alive)."""
        if buffer.nbytes < self.nbytes or not buffer.flags.c_contiguous:
            raise ValueError(f"buffer of {buffer.nbytes} bytes cannot hold {self.nbytes}")
        self.data = buffer[: self.nbytes]
        ctypes.c_void_p.from_address(self.tensor + _data_offset()).value = self.data.ctypes.data

    @classmethod
    def from_bytes(cls, gtype: int, rows: int, cols: int, raw) -> "Weight":
        """A tensor holding a copy of ``raw`` (bytes in ggml's layout for ``gtype``, e.g. from a GGUF)."""
        out = cls(gtype, rows, cols)
        src = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
        if src.nbytes != out.nbytes:
            raise ValueError(f"{type_name(gtype)} [{rows}, {cols}] needs {out.nbytes:,} bytes, got {src.nbytes:,}")
        out.data[:] = src
        return out

    @classmethod
    def quantized(cls, w: np.ndarray, gtype: int = Q8_0) -> "Weight":
        """Quantize a float matrix [rows, cols] with ggml's own quantizer."""
        base, _ = _load()
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = cls(gtype, *w.shape)
        if gtype == F32:
            out.data[:] = w.view(np.uint8).ravel()
        else:
            base.ggml_quantize_chunk(gtype, w.ctypes.data, out.data.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out

    def close(self) -> None:
        if self._ctx:
            _load()[0].ggml_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()


class Graph:
    """One computation: inputs copied in, ops recorded, ``compute`` runs and returns outputs.

    >>> w = Weight.quantized(np.eye(64, dtype=np.float32), Q8_0)
    >>> g = Graph()
    >>> y = g.matmul(w, g.input(np.arange(64, dtype=np.float32)[None, :]))
    >>> out = g.compute([y], threads=1)[0]
    >>> bool(np.allclose(out[0], np.arange(64), atol=0.5))
    True
    """

    def __init__(self, mem_bytes: int = 8 << 20, buffer: np.ndarray | None = None):
        base, self._cpu = _load()
        self._base = base
        self._mem = buffer if buffer is not None and buffer.nbytes >= mem_bytes else np.empty(mem_bytes, np.uint8)
        self._ctx = base.ggml_init(_InitParams(self._mem.nbytes, self._mem.ctypes.data, False))
        self._shapes: dict[int, tuple[int, int]] = {}

    def input(self, x: np.ndarray) -> int:
        """x [T, n] float32 -> a ggml tensor (ne0 = n, ne1 = T)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = self._base.ggml_new_tensor_2d(self._ctx, F32, x.shape[1], x.shape[0])
        ctypes.memmove(self._base.ggml_get_data(t), x.ctypes.data, x.nbytes)
        self._shapes[t] = x.shape
        return t

    def matmul(self, w: Weight, x: int) -> int:
        """x [T, cols] -> [T, rows]: x @ W.T."""
        t = self._base.ggml_mul_mat(self._ctx, w.tensor, x)
        self._shapes[t] = (self._shapes[x][0], w.rows)
        return t

    def get_rows(self, w: Weight, ids: np.ndarray) -> int:
        """Rows ``ids`` of ``w`` as float32 [len(ids), cols] (ggml dequantizes them)."""
        idx = np.ascontiguousarray(ids, dtype=np.int32)
        t = self._base.ggml_new_tensor_1d(self._ctx, I32, len(idx))
        ctypes.memmove(self._base.ggml_get_data(t), idx.ctypes.data, idx.nbytes)
        out = self._base.ggml_get_rows(self._ctx, w.tensor, t)
        self._shapes[out] = (len(idx), w.cols)
        return out

    def swiglu(self, gate: int, up: int) -> int:
        """silu(gate) * up, elementwise."""
        t = self._base.ggml_mul(self._ctx, self._base.ggml_silu(self._ctx, gate), up)
        self._shapes[t] = self._shapes[gate]
        return t

    def compute(self, outputs: list[int], threads: int) -> list[np.ndarray]:
        graph = self._base.ggml_new_graph(self._ctx)
        for t in outputs:
            self._base.ggml_build_forward_expand(graph, t)
        status = self._cpu.ggml_graph_compute_with_ctx(self._ctx, graph, threads)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        res = []
        for t in outputs:
            shape = self._shapes[t]
            ptr = ctypes.cast(self._base.ggml_get_data(t), ctypes.POINTER(ctypes.c_float))
            res.append(np.ctypeslib.as_array(ptr, shape=shape).copy())
        self._base.ggml_free(self._ctx)
        self._ctx = None
        return res
