"""Weights in ONNX Runtime's block-quantized layouts: MatMulNBits matrices and QMoE experts.

Quantization is ONNX Runtime's own (``quantize_matmul_{4,8}bits``, what its MatMulNBitsQuantizer
calls): asymmetric, one float scale and one integer zero point per ``block`` weights along the
input dimension. Dequantization is here too, so the reference engine can run the exact weights an
ONNX bundle holds (the parity tests compare the two at the same quantization).

Layouts, for a matrix W [N out, K in] with kb = K / block blocks per row:
  packed  uint8 [N, kb, block * bits / 8]   (4 bits: the lower nibble is the earlier weight)
  scales  float32 [N, kb]
  zeros   uint8 [N, ceil(kb * bits / 8)]    (4 bits: two blocks' zero points per byte)
QMoE stacks one such matrix per expert: packed [E, N, K * bits / 8], scales [E, N, kb],
zeros [E, N, ceil(kb * bits / 8)].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)


@dataclass(frozen=True)
class QMatrix:
    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        n, kb = self.scales.shape
        return n, kb * self.block


def quantize(w: np.ndarray, bits: int, block: int) -> QMatrix:
    """W [N, K] float -> its MatMulNBits form (K must be a whole number of blocks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if bits not in BITS:
        raise ValueError(f"ONNX Runtime block quantization here is 4 or 8 bits, not {bits}")
    n, k = w.shape
    if k % block:
        raise ValueError(f"input dimension {k} is not a whole number of {block}-weight blocks")
    kb = k // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zeros = np.zeros((n, (kb * bits + 7) // 8), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w.T, dtype=np.float32), scales, zeros, block, n, k, False)
    return QMatrix(packed, scales, zeros, bits, block)


def _codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes, one per weight, from bytes packed low nibble first (4 bits) or whole (8)."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def dequantize(q: QMatrix) -> np.ndarray:
    """The float32 matrix [N, K] a QMatrix stands for: (code - zero point) * scale, per block."""
    n, kb = q.scales.shape
    codes = _codes(q.packed, q.bits).astype(np.float32)  # [N, kb, block]
    zp = _codes(q.zeros, q.bits)[:, :kb].astype(np.float32)  # [N, kb]
    return ((codes - zp[..., None]) * q.scales[..., None]).reshape(n, kb * q.block)


def interleave_rows(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[gate; up] rows interleaved g0, u0, g1, u1, ...: QMoE's fused SwiGLU layout (swiglu_fusion=1)."""
    f, k = gate.shape
    out = np.empty((2 * f, k), gate.dtype)
    out[0::2], out[1::2] = gate, up
    return out


def round_trip(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """W as an ONNX bundle holds it: quantized and dequantized again (rows are independent)."""
    return dequantize(quantize(w.reshape(-1, w.shape[-1]), bits, block)).reshape(w.shape)


def expert_block(bits: int, k: int, block: int) -> int:
    """QMoE's block along an expert matrix's input dimension k: 8-bit experts are quantized per row
    (ONNX Runtime has fp32-activation kernels for them only without blocks), 4-bit ones per block."""
    return k if bits == 8 else block


def as_stored(weights, bits: int, block: int):
    """ModelWeights with every matrix an ONNX bundle quantizes replaced by its dequantized form
    (routers, norms and biases stay float, as in the bundle): the reference engine then computes
    with exactly the weights ONNX Runtime reads."""
    from dataclasses import replace

    rt = lambda w: None if w is None else round_trip(w, bits, block)  # noqa: E731
    ex = lambda w: round_trip(w, bits, expert_block(bits, w.shape[-1], block))  # noqa: E731
    layers = [replace(lw, wq=rt(lw.wq), wk=rt(lw.wk), wv=rt(lw.wv), wo=rt(lw.wo), gate=ex(lw.gate), up=ex(lw.up),
                      down=ex(lw.down), shared_gate=rt(lw.shared_gate), shared_up=rt(lw.shared_up),
                      shared_down=rt(lw.shared_down)) for lw in weights.layers]
    head = lambda w: round_trip(w, 8, block)  # noqa: E731  (onnx_graph.HEAD_BITS)
    embed = head(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else head(weights.lm_head)
    return replace(weights, embed=embed, lm_head=lm_head, layers=layers)
