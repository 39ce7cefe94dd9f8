"""Nested-bit ("matryoshka") expert quantization: one record whose byte prefixes are lower-bit experts.

D²MoE (MobiCom'25) stores each expert once so that reading fewer bytes gives fewer bits. Here
every weight gets an 8-bit asymmetric code per group of G inputs (scale s, offset z per group,
fp16): q = round((w - z) / s), q in 0..255. The record is

    header: s and z of every group of the expert's matrices (fp16)
    plane 7 | plane 6 | ... | plane 0       (plane p: bit p of every code, packed 8 per byte)

so the first b planes hold the top b bits of every code. A b-bit expert decodes q_b = q >> (8-b)
to the centre of its bin: w = z + s * (q_b * 2^(8-b) + (2^(8-b) - 1) / 2), and the 8-bit expert to
w = z + s * q. Reading a b-bit expert reads ``prefix_bytes(b)`` bytes. Bits below MIN_BITS are not
offered: a 1-bit expert is not a usable model.

Which tensors are quantized is an explicit rule (``is_routed_expert``): the routed experts' FFN
matrices only; routers, norms, attention, embeddings and shared experts keep their precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 64  # inputs per (scale, offset) group: 0.5 bits/weight of header, as ggml's Q4_1 at 32
MIN_BITS, MAX_BITS = 2, 8


def is_routed_expert(name: str) -> bool:
    """The explicit quantization rule: canonical tensor names of routed expert FFN matrices."""
    return name.rsplit(".", 1)[-1] in ("gate", "up", "down") and ".shared" not in name


@dataclass(frozen=True)
class NestedLayout:
    """Byte layout of one expert record for matrices of the given shapes (each [rows, cols])."""

    shapes: tuple[tuple[int, int], ...]
    group: int = GROUP

    def __post_init__(self) -> None:
        for r, c in self.shapes:
            if c % self.group:
                raise ValueError(f"input size {c} is not a multiple of the group size {self.group}")

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
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        return self.header_bytes + bits * self.plane_bytes

    @property
    def record_bytes(self) -> int:
        return self.prefix_bytes(MAX_BITS)


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


def encode(mats: list[np.ndarray], group: int = GROUP) -> bytes:
    """One expert's matrices -> its nested record (header, then bit planes from the top bit)."""
    layout = NestedLayout(tuple(m.shape for m in mats), group)
    codes, headers = [], []
    for m in mats:
        q, s, z = quantize_codes(m, group)
        codes.append(q.ravel())
        headers.append(np.stack([s.ravel(), z.ravel()], axis=1).ravel())  # s0 z0 s1 z1 ...
    q = np.concatenate(codes)
    out = bytearray(np.concatenate(headers).astype("<f2").tobytes())
    for p in range(MAX_BITS - 1, -1, -1):
        out += np.packbits((q >> p) & 1).tobytes()
    assert len(out) == layout.record_bytes
    return bytes(out)


def decode(buf: bytes | memoryview | np.ndarray, layout: NestedLayout, bits: int) -> list[np.ndarray]:
    """The ``bits``-bit expert from (at least) the first ``layout.prefix_bytes(bits)`` bytes."""
    need = layout.prefix_bytes(bits)
    raw = np.frombuffer(buf, dtype=np.uint8, count=need)
    header = raw[: layout.header_bytes].view("<f2").astype(np.float32).reshape(-1, 2)
    n = layout.n_weights
    q = np.zeros(n, dtype=np.uint8)
    for i in range(bits):  # plane i holds bit (7 - i); it lands at bit (bits - 1 - i) of q_b
        start = layout.header_bytes + i * layout.plane_bytes
        plane = np.unpackbits(raw[start : start + layout.plane_bytes], count=n)
        q |= plane << np.uint8(bits - 1 - i)
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
