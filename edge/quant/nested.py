"""Nested-bit ("matryoshka") expert quantization: one record whose byte prefixes are lower-bit experts.

D²MoE (MobiCom'25) stores each expert once so that reading fewer bytes gives fewer bits. Here
every weight gets an 8-bit asymmetric code per group of G inputs (scale s, offset z per group,
fp16): q = round((w - z) / s), q in 0..255. The record is

    header: s and z of every group of the expert's matrices (fp16)
    top:    bits 7-6 of every code, 4 codes per byte
    plane 5 | plane 4 | ... | plane 0       (plane p: bit p of every code, 8 codes per byte)

so the first ``header + b * n / 8`` bytes hold the top b bits of every code (b >= 2). Codes are
stored in ggml's Q4_1 nibble order within each block of 32 weights (0, 16, 1, 17, ..., 15, 31),
so that turning a b-bit prefix (b <= 4) into ggml Q4_1 blocks is a few table look-ups
(``to_q4_1``) instead of per-weight bit work. A b-bit expert decodes q_b = q >> (8-b)
to the centre of its bin: w = z + s * (q_b * 2^(8-b) + (2^(8-b) - 1) / 2), and the 8-bit expert to
w = z + s * q. Reading a b-bit expert reads ``prefix_bytes(b)`` bytes. Bits below MIN_BITS are not
offered: a 1-bit expert is not a usable model.

Which tensors are quantized is an explicit rule (``is_routed_expert``): the routed experts' FFN
matrices only; routers, norms, attention, embeddings and shared experts keep their precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge import _native as native

GROUP = 64  # inputs per (scale, offset) group: 0.5 bits/weight of header, as ggml's Q4_1 at 32
MIN_BITS, MAX_BITS = 2, 8


def is_routed_expert(name: str) -> bool:
    """The explicit quantization rule: canonical tensor names of routed expert FFN matrices."""
    return name.rsplit(".", 1)[-1] in ("gate", "up", "down") and ".shared" not in name


@dataclass(frozen=True)
class NestedLayout:
    """Byte layout of one expert record for matrices of the given shapes (each [rows, cols]).

    ``max_bits``: the bit planes a record stores (8: every plane of the 8-bit codes). A record
    built from a source that holds fewer bits (a Q4_K GGUF) can stop earlier: planes below the
    source's own precision hold rounding noise of its dequantization, not information."""

    shapes: tuple[tuple[int, int], ...]
    group: int = GROUP
    max_bits: int = MAX_BITS

    def __post_init__(self) -> None:
        for r, c in self.shapes:
            if c % self.group:
                raise ValueError(f"input size {c} is not a multiple of the group size {self.group}")
        if not MIN_BITS <= self.max_bits <= MAX_BITS:
            raise ValueError(f"records store {MIN_BITS}..{MAX_BITS} bits, not {self.max_bits}")

    @property
    def n_weights(self) -> int:
        return sum(r * c for r, c in self.shapes)

    @property
    def n_groups(self) -> int:
        return self.n_weights // self.group

    @property
    def header_bytes(self) -> int:
        return self.n_groups * 2 * 2  # fp16 scale and offset per group

    @property
    def plane_bytes(self) -> int:
        return (self.n_weights + 7) // 8

    def prefix_bytes(self, bits: int) -> int:
        """Bytes to read for a ``bits``-bit expert."""
        if not MIN_BITS <= bits <= self.max_bits:
            raise ValueError(f"bits must be in {MIN_BITS}..{self.max_bits}, got {bits}")
        return self.header_bytes + bits * self.plane_bytes

    @property
    def record_bytes(self) -> int:
        return self.prefix_bytes(self.max_bits)


def quantize_codes(w: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [R, C] -> (codes uint8 [R, C], scale fp16 [R, C/G], offset fp16 [R, C/G])."""
    r, c = w.shape
    g = w.reshape(r, c // group, group).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    scale = ((hi - lo) / 255.0).astype(np.float16)
    offset = lo.astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((g - offset.astype(np.float32)[..., None]) / safe), 0, 255).astype(np.uint8)
    return q.reshape(r, c), scale, offset


BLOCK = 32  # ggml Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles (weight j low, j + 16 high)
_PERM = np.array([j // 2 + (j % 2) * 16 for j in range(BLOCK)])  # 0, 16, 1, 17, ...
_INV = np.argsort(_PERM)


def _top_lut(shift: int) -> np.ndarray:
    """byte of four 2-bit codes (first in bits 7-6) -> two Q4_1 nibble bytes, as uint16."""
    v = np.arange(256)
    a = [((v >> (6 - 2 * j)) & 3) << shift for j in range(4)]
    return ((a[0] | a[1] << 4) | (a[2] | a[3] << 4) << 8).astype(np.uint16)


def _plane_lut(shift: int) -> np.ndarray:
    """byte of eight 1-bit codes (first in bit 7) -> four Q4_1 nibble bytes, as uint32."""
    v = np.arange(256)
    bit = [((v >> (7 - j)) & 1) << shift for j in range(8)]
    return sum((bit[2 * k] | bit[2 * k + 1] << 4) << (8 * k) for k in range(4)).astype(np.uint32)


_TOP_LUT = [_top_lut(s) for s in range(3)]
_PLANE_LUT = [_plane_lut(s) for s in range(3)]


def encode(mats: list[np.ndarray], group: int = GROUP, max_bits: int = MAX_BITS) -> bytes:
    """One expert's matrices -> its nested record (header, top two bits, then one plane per bit,
    down to ``max_bits``)."""
    layout = NestedLayout(tuple(m.shape for m in mats), group, max_bits)
    codes, headers = [], []
    for m in mats:
        q, s, z = quantize_codes(m, group)
        codes.append(q.ravel())
        headers.append(np.stack([s.ravel(), z.ravel()], axis=1).ravel())  # s0 z0 s1 z1 ...
    q = np.concatenate(codes).reshape(-1, BLOCK)[:, _PERM].ravel()  # nibble order
    top = q >> 6
    out = bytearray(np.concatenate(headers).astype("<f2").tobytes())
    out += (top[0::4] << 6 | top[1::4] << 4 | top[2::4] << 2 | top[3::4]).astype(np.uint8).tobytes()
    for p in range(MAX_BITS - 3, MAX_BITS - 1 - max_bits, -1):
        out += np.packbits((q >> p) & 1).tobytes()
    assert len(out) == layout.record_bytes
    return bytes(out)


def _sections(buf, layout: NestedLayout, bits: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    raw = np.frombuffer(buf, dtype=np.uint8, count=layout.prefix_bytes(bits))
    h, n = layout.header_bytes, layout.n_weights
    header = raw[:h].view("<f2").reshape(-1, 2)
    top = raw[h : h + n // 4]
    planes = [raw[h + n // 4 + i * (n // 8) : h + n // 4 + (i + 1) * (n // 8)] for i in range(bits - 2)]
    return header, top, planes


def _codes(top: np.ndarray, planes: list[np.ndarray], bits: int, n: int) -> np.ndarray:
    """Top ``bits`` bits of every code, back in row-major order, [n] uint8."""
    q = np.empty(n, dtype=np.uint8)
    for j in range(4):
        q[j::4] = (top >> (6 - 2 * j)) & 3
    for plane in planes:
        q = (q << 1) | np.unpackbits(plane, count=n)
    return q.reshape(-1, BLOCK)[:, _INV].ravel()


def decode(buf: bytes | memoryview | np.ndarray, layout: NestedLayout, bits: int) -> list[np.ndarray]:
    """The ``bits``-bit expert as float32 matrices, from (at least) its ``prefix_bytes(bits)``."""
    header, top, planes = _sections(buf, layout, bits)
    header = header.astype(np.float32)
    q = _codes(top, planes, bits, layout.n_weights)
    shift = MAX_BITS - bits
    centre = ((1 << shift) - 1) / 2.0
    mats, w_at, g_at = [], 0, 0
    for r, c in layout.shapes:
        ng = r * c // layout.group
        s, z = header[g_at : g_at + ng, 0], header[g_at : g_at + ng, 1]
        qq = q[w_at : w_at + r * c].reshape(ng, layout.group).astype(np.float32)
        w = z[:, None] + s[:, None] * (qq * float(1 << shift) + centre)
        mats.append(w.reshape(r, c).astype(np.float32))
        w_at, g_at = w_at + r * c, g_at + ng
    return mats


def q4_1_bytes(layout: NestedLayout) -> int:
    """Size of the expert as ggml Q4_1 blocks (20 bytes per 32 weights)."""
    return layout.n_weights // BLOCK * 20


def to_q4_1(buf, layout: NestedLayout, bits: int, out: np.ndarray | None = None,
            scratch: np.ndarray | None = None) -> np.ndarray:
    """The ``bits``-bit expert (2 <= bits <= 4) as ggml Q4_1 blocks for each matrix, back to back.

    Exact: the b-bit code q_b becomes the nibble, d = s * 2^(8-b) and m = z + s * (2^(8-b) - 1) / 2
    (rounded to fp16, as Q4_1 stores them). ``scratch`` (n_weights bytes, reused across calls)
    avoids allocating temporaries: fresh multi-megabyte arrays cost page faults on every call."""
    if not MIN_BITS <= bits <= 4:
        raise ValueError(f"Q4_1 holds 2..4-bit experts, not {bits}")
    header, top, planes = _sections(buf, layout, bits)
    n = layout.n_weights
    nb = n // BLOCK
    if out is None:
        out = np.empty(nb * 20, dtype=np.uint8)
    s, z = header[:, 0].astype(np.float32), header[:, 1].astype(np.float32)
    shift = MAX_BITS - bits
    d16 = (s * float(1 << shift)).astype("<f2")
    m16 = (z + s * (((1 << shift) - 1) / 2.0)).astype("<f2")
    if native.nested_to_q4_1 is not None and top.flags.c_contiguous:
        if out.nbytes < nb * 20 or not out.flags.c_contiguous:
            raise ValueError(f"output buffer of {out.nbytes} bytes cannot hold {nb * 20}")
        # the planes follow the top section directly in the record
        rc = native.nested_to_q4_1(top.ctypes.data, top.ctypes.data + n // 4, n, bits,
                                   d16.ctypes.data, m16.ctypes.data, out.ctypes.data)
        if rc != 0:
            raise ValueError(f"native Q4_1 conversion refused {n} weights at {bits} bits")
        return out
    _warn_numpy_once()
    return _to_q4_1_numpy(top, planes, n, bits, d16, m16, out, scratch)


_warned: list[bool] = []


def _warn_numpy_once() -> None:
    if native.nested_to_q4_1 is None and not _warned:
        _warned.append(True)
        logging.getLogger(__name__).warning(
            "edge's native helper (edge/_native/nested.c) is not built: experts convert with numpy, about 3x slower; "
            "reinstall edge with a C compiler present")


def _to_q4_1_numpy(top, planes, n, bits, d16, m16, out, scratch):
    """The same computation with numpy table look-ups (used when the native helper is absent)."""
    if scratch is None:
        scratch = np.empty(n, dtype=np.uint8)
    q = scratch[: n // 2].view(np.uint32)  # [n/8]: 4 nibble bytes per element
    tmp = scratch[n // 2 : n].view(np.uint32)
    np.take(_TOP_LUT[bits - 2], top, out=q.view(np.uint16))
    for i, plane in enumerate(planes):
        np.take(_PLANE_LUT[bits - 3 - i], plane, out=tmp)
        np.bitwise_or(q, tmp, out=q)
    nb = n // BLOCK
    per = GROUP // BLOCK
    blocks = out[: nb * 20].reshape(nb // per, per, 20)  # [groups, blocks per group, 20 bytes]
    blocks[:, :, 0:2] = d16.view(np.uint8).reshape(-1, 1, 2)
    blocks[:, :, 2:4] = m16.view(np.uint8).reshape(-1, 1, 2)
    blocks[:, :, 4:] = q.view(np.uint8).reshape(nb // per, per, 16)
    return out


def rtn(w: np.ndarray, bits: int, group: int = GROUP) -> np.ndarray:
    """Plain round-to-nearest asymmetric quantization at ``bits`` (min/max grid per group), for
    comparison: the quality a separately stored b-bit copy would have."""
    r, c = w.shape
    g = w.reshape(r, c // group, group).astype(np.float32)
    lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    levels = (1 << bits) - 1
    s = (hi - lo).astype(np.float16).astype(np.float32) / levels
    lo = lo.astype(np.float16).astype(np.float32)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((g - lo) / safe), 0, levels)
    return (lo + q * s).reshape(r, c)


def quantized_copy(weights, bits: int, method: str = "nested"):
    """A copy of ModelWeights whose routed experts went through ``bits``-bit quantization
    (``nested``: decode of the record's b-bit prefix; ``rtn``: plain round-to-nearest) and
    everything else untouched. For measuring quality; the runtime reads records instead."""
    from dataclasses import replace

    layers = []
    for lw in weights.layers:
        new = {}
        for e in range(lw.gate.shape[0]):
            mats = [lw.gate[e], lw.up[e], lw.down[e]]
            if method == "nested":
                layout = NestedLayout(tuple(m.shape for m in mats))
                mats = decode(encode(mats), layout, bits)
            elif method == "rtn":
                mats = [rtn(m, bits) for m in mats]
            else:
                raise ValueError(f"unknown method {method!r}")
            for name, m in zip(("gate", "up", "down"), mats):
                new.setdefault(name, []).append(m)
        layers.append(replace(lw, **{k: np.stack(v) for k, v in new.items()}))
    return replace(weights, layers=layers)
