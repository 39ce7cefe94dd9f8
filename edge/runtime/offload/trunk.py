"""The trunk of a MoE model for the offload engine: everything but the routed experts, as ggml
tensors (the matrix products) and numpy vectors (norms, routers, biases).

Two sources: canonical float weights (an offload bundle's dense file), quantized here to Q8_0 with
ggml's own quantizer, or a GGUF file's own tensors, copied in their own types (Q4_K, Q6_K, ...)
and computed by ggml's kernels for those types, so nothing is converted or lost.
Shapes: D hidden, H heads, G kv heads, Dh head dim, E experts, S shared-expert FFN, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ModelFormatError, UnsupportedModelError
from edge.formats.weights import ModelWeights
from edge.runtime import ggml
from edge.spec import ModelSpec


@dataclass
class LayerTrunk:
    attn_norm: np.ndarray  # [D]
    ffn_norm: np.ndarray  # [D]
    router: np.ndarray  # [E, D] float32
    wq: ggml.Weight | int  # an int: the matrix's index in a BitStack stack, rebuilt on each use
    wk: ggml.Weight | int
    wv: ggml.Weight | int
    wo: ggml.Weight | int
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # [Dh]
    k_norm: np.ndarray | None = None
    shared: tuple[ggml.Weight, ggml.Weight, ggml.Weight, np.ndarray] | None = None  # gate, up, down, router [1, D]


@dataclass
class Trunk:
    spec: ModelSpec
    embed: ggml.Weight  # [V, D]: token rows are looked up with ggml's get_rows (any type)
    norm: np.ndarray  # [D]
    lm_head: ggml.Weight  # [V, D]
    layers: list[LayerTrunk]
    source: str  # "q8_0 from float weights" or "GGUF types: Q4_K, Q6_K, ..."

    @property
    def nbytes(self) -> int:
        """Bytes of the trunk's matrices (the vectors are small)."""
        ws = [self.embed, self.lm_head]
        for lt in self.layers:
            ws += [w for w in (lt.wq, lt.wk, lt.wv, lt.wo) if isinstance(w, ggml.Weight)]
            if lt.shared:
                ws += list(lt.shared[:3])
        return sum(w.nbytes for w in {id(w): w for w in ws}.values())


def from_weights(dense: ModelWeights, stacked: dict[tuple[int, str], int] | None = None) -> Trunk:
    """A trunk from canonical float weights: matrices quantized to Q8_0, the embedding to F16;
    ``stacked`` maps (layer, "wq"...) to BitStack stack indices for matrices a stack holds."""
    q8, stacked = ggml.Q8_0, stacked or {}

    def mat(i: int, name: str, w: np.ndarray):
        return stacked[(i, name)] if (i, name) in stacked else ggml.Weight.quantized(w, q8)

    layers = []
    for i, lw in enumerate(dense.layers):
        layers.append(LayerTrunk(
            attn_norm=lw.attn_norm, ffn_norm=lw.ffn_norm, router=np.asarray(lw.router, np.float32),
            wq=mat(i, "wq", lw.wq), wk=mat(i, "wk", lw.wk), wv=mat(i, "wv", lw.wv), wo=mat(i, "wo", lw.wo),
            bq=lw.bq, bk=lw.bk, bv=lw.bv, q_norm=lw.q_norm, k_norm=lw.k_norm,
            shared=None if lw.shared_gate is None else (
                ggml.Weight.quantized(lw.shared_gate, q8), ggml.Weight.quantized(lw.shared_up, q8),
                ggml.Weight.quantized(lw.shared_down, q8), np.asarray(lw.shared_router, np.float32))))
    embed = ggml.Weight.quantized(dense.embed, ggml.F16)
    lm_head = embed if dense.lm_head is dense.embed else ggml.Weight.quantized(dense.lm_head, q8)
    return Trunk(dense.spec, embed, np.asarray(dense.norm, np.float32), lm_head, layers, "Q8_0 from float weights")


def from_gguf(path: Path, reader, spec: ModelSpec) -> Trunk:
    """A trunk from a GGUF file's own tensors (``reader``: edge.formats.gguf_read.open_reader),
    each matrix copied once in its file type; every type must be one ggml computes here."""
    from edge.formats.gguf_write import unpermute_qk

    tensors = {t.name: t for t in reader.tensors}
    names: list[str] = []

    def info(name: str):
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{Path(path).name} lacks tensor {name}")
        names.append(name)
        return t

    def vec(name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = info(name)
        # a copy: for F32 the dequantized array is a view of the file's memory map, which would keep
        # every page of the file this process touched mapped (312 MB on model B)
        return np.array(dequantize(t.bytes_of(reader), t.tensor_type), np.float32).reshape(tuple(reversed(t.shape)))

    def opt_vec(name: str) -> np.ndarray | None:
        return vec(name) if name in tensors else None

    def mat(name: str, unpermute_heads: int = 0) -> ggml.Weight:
        t = info(name)
        if t.tensor_type.name not in ggml.COMPUTABLE:
            raise UnsupportedModelError(f"{Path(path).name}: tensor {name} is {t.tensor_type.name}, which edge does not "
                                        f"compute (supported: {', '.join(ggml.COMPUTABLE)})")
        cols, rows = t.shape[0], int(np.prod(t.shape[1:]))
        raw = t.bytes_of(reader).reshape(rows, -1)
        if unpermute_heads:  # llama-style GGUFs interleave RoPE pairs in Q and K; the engine rotates halves
            raw = np.ascontiguousarray(unpermute_qk(raw, unpermute_heads))
        return ggml.Weight.from_bytes(int(t.tensor_type), rows, cols, raw)

    interleaved = spec.arch == "mixtral"
    layers = []
    for i in range(spec.n_layers):
        b = f"blk.{i}"
        shared = None
        if spec.n_shared_experts:
            shared = (mat(f"{b}.ffn_gate_shexp.weight"), mat(f"{b}.ffn_up_shexp.weight"),
                      mat(f"{b}.ffn_down_shexp.weight"), vec(f"{b}.ffn_gate_inp_shexp.weight").reshape(1, -1))
        layers.append(LayerTrunk(
            attn_norm=vec(f"{b}.attn_norm.weight"), ffn_norm=vec(f"{b}.ffn_norm.weight"),
            router=vec(f"{b}.ffn_gate_inp.weight"),
            wq=mat(f"{b}.attn_q.weight", spec.n_heads if interleaved else 0),
            wk=mat(f"{b}.attn_k.weight", spec.n_kv_heads if interleaved else 0),
            wv=mat(f"{b}.attn_v.weight"), wo=mat(f"{b}.attn_output.weight"),
            bq=opt_vec(f"{b}.attn_q.bias"), bk=opt_vec(f"{b}.attn_k.bias"), bv=opt_vec(f"{b}.attn_v.bias"),
            q_norm=opt_vec(f"{b}.attn_q_norm.weight"), k_norm=opt_vec(f"{b}.attn_k_norm.weight"), shared=shared))
    embed = mat("token_embd.weight")
    lm_head = mat("output.weight") if "output.weight" in tensors else embed
    types = sorted({tensors[n].tensor_type.name for n in names if len(tensors[n].shape) > 1})
    return Trunk(spec, embed, vec("output_norm.weight"), lm_head, layers, "GGUF types " + ", ".join(types))


def load_gguf_trunk(path: Path, spec: ModelSpec) -> Trunk:
    """:func:`from_gguf` on its own reader, which is then released, and the file's pages given back
    to the kernel: a page cache full of the trunk's tensors counts against a cgroup's budget (on
    model B, 1.18 GB of footprint beside 650 MB of RSS), and pages still mapped cannot be dropped."""
    import gc

    from edge.formats.gguf_read import open_reader

    reader = open_reader(path)
    trunk = from_gguf(path, reader, spec)
    del reader
    gc.collect()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return trunk
