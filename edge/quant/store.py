"""The expert store's file format: one file holding every expert's nested record, its index, and
the writer. (The reader, with O_DIRECT positioned reads, is the offload engine's:
edge/runtime/offload/store.py.)

Layout: records in (layer, expert) order, each starting on a 4 KiB boundary, so that a b-bit
prefix is one aligned read. Every record carries a CRC-32 per section (header + top two bits,
then one per bit plane), kept in the bundle manifest: a b-bit read checks exactly the sections
it read, and a damaged record is refused by layer and expert before anything is computed from it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge.quant.nested import MAX_BITS, MIN_BITS, NestedLayout

ALIGN = 4096  # every record starts on a 4 KiB boundary: O_DIRECT reads need aligned offsets


def round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def read_bytes(layout: NestedLayout, bits: int) -> int:
    """Bytes one read of a ``bits``-bit expert transfers: its prefix (scale/offset header + ``bits``
    bit planes), rounded up to whole 4 KiB blocks. The planner prices loads with this."""
    return round_up(layout.prefix_bytes(bits))


def section_ends(layout: NestedLayout) -> list[int]:
    """Byte offsets (within a record) where each checksummed section ends: 2-bit prefix, then planes."""
    return [layout.prefix_bytes(b) for b in range(MIN_BITS, layout.max_bits + 1)]


@dataclass(frozen=True)
class StoreIndex:
    layout: NestedLayout
    n_layers: int
    n_experts: int
    stride: int  # bytes between record starts (record size rounded up to 4 KiB)
    crcs: tuple[tuple[int, ...], ...]  # [layer * n_experts + expert] -> CRC-32 per section

    def offset(self, layer: int, expert: int) -> int:
        return (layer * self.n_experts + expert) * self.stride

    @property
    def file_bytes(self) -> int:
        return self.n_layers * self.n_experts * self.stride

    def to_dict(self) -> dict:
        return {"shapes": [list(s) for s in self.layout.shapes], "group": self.layout.group,
                "max_bits": self.layout.max_bits, "n_layers": self.n_layers, "n_experts": self.n_experts, "stride": self.stride,
                "crc32": [list(c) for c in self.crcs]}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreIndex":
        layout = NestedLayout(tuple(tuple(s) for s in d["shapes"]), d["group"], int(d.get("max_bits", MAX_BITS)))
        return cls(layout, d["n_layers"], d["n_experts"], d["stride"], tuple(tuple(c) for c in d["crc32"]))


def write_store(path: Path, layout: NestedLayout, n_layers: int, n_experts: int,
                records: Iterator[bytes], progress: Callable[[int], None] | None = None) -> StoreIndex:
    """Write records (in layer, expert order) and return their index with section checksums."""
    stride = round_up(layout.record_bytes)
    ends = section_ends(layout)
    crcs = []
    pad = bytes(stride - layout.record_bytes)
    with open(path, "wb") as f:
        for i, rec in enumerate(records):
            if len(rec) != layout.record_bytes:
                raise ValueError(f"record {i} has {len(rec)} bytes, layout needs {layout.record_bytes}")
            starts = [0, *ends[:-1]]
            crcs.append(tuple(zlib.crc32(rec[a:b]) for a, b in zip(starts, ends)))
            f.write(rec)
            f.write(pad)
            if progress:
                progress(i + 1)
    if len(crcs) != n_layers * n_experts:
        raise ValueError(f"wrote {len(crcs)} records, expected {n_layers * n_experts}")
    return StoreIndex(layout, n_layers, n_experts, stride, tuple(crcs))
