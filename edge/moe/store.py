"""The expert store: one file holding every expert's nested record, read with large positioned reads.

Layout: records in (layer, expert) order, each starting on a 4 KiB boundary, so that a b-bit
prefix is one aligned read. Every record carries a CRC-32 per section (header + top two bits,
then one per bit plane), kept in the bundle manifest: a b-bit read checks exactly the sections
it read, and a damaged record is refused by layer and expert before anything is computed from it.

Reads go through O_DIRECT where the filesystem allows it (no page cache, so the memory budget
sees only our own buffers) and otherwise through buffered reads followed by
POSIX_FADV_DONTNEED, which drops the pages again; ``mode`` picks one explicitly.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.quant.nested import MAX_BITS, MIN_BITS, NestedLayout

ALIGN = 4096


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def section_ends(layout: NestedLayout) -> list[int]:
    """Byte offsets (within a record) where each checksummed section ends: 2-bit prefix, then planes."""
    return [layout.prefix_bytes(b) for b in range(MIN_BITS, MAX_BITS + 1)]


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
                "n_layers": self.n_layers, "n_experts": self.n_experts, "stride": self.stride,
                "crc32": [list(c) for c in self.crcs]}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreIndex":
        layout = NestedLayout(tuple(tuple(s) for s in d["shapes"]), d["group"])
        return cls(layout, d["n_layers"], d["n_experts"], d["stride"], tuple(tuple(c) for c in d["crc32"]))


def write_store(path: Path, layout: NestedLayout, n_layers: int, n_experts: int,
                records: Iterator[bytes], progress: Callable[[int], None] | None = None) -> StoreIndex:
    """Write records (in layer, expert order) and return their index with section checksums."""
    stride = _round_up(layout.record_bytes)
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


HUGE = 2 << 20  # x86-64 / arm64 transparent huge page


def aligned_buffer(nbytes: int, *, huge: bool = True) -> np.ndarray:
    """A uint8 buffer of nbytes, page aligned (O_DIRECT needs 4 KiB), zero-filled.

    ``huge``: back it with 2 MiB transparent huge pages where the kernel allows (madvise mode is
    the common default): an O_DIRECT read then pins a few huge pages instead of a thousand small
    ones, which made 4 MiB reads 1.2-2.6x faster on this machine (docs/planner.md)."""
    pad = HUGE if huge else 0
    m = anonymous_map(nbytes + pad, huge=huge)
    start = (-np.frombuffer(m, np.uint8, count=1).ctypes.data) % (HUGE if huge else ALIGN)
    return np.frombuffer(m, np.uint8, count=nbytes, offset=start)


def anonymous_map(nbytes: int, *, huge: bool):
    """A private anonymous mapping (a shared one would be shmem, which never gets THP), advised
    to use transparent huge pages or, with ``huge=False``, 4 KiB pages only."""
    import mmap

    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:  # a kernel without THP: small pages it is
            pass
    return m


class ExpertStore:
    """Positioned reads of b-bit expert prefixes, checksum-verified."""

    def __init__(self, path: Path, index: StoreIndex, *, mode: str = "auto"):
        self.path, self.index = Path(path), index
        size = self.path.stat().st_size
        if size < index.file_bytes:
            raise BundleError(f"expert store {self.path.name} is {size:,} bytes; its index needs {index.file_bytes:,}")
        self.mode = mode
        self._fd = -1
        if mode in ("auto", "direct"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                self.mode = "direct"
                self._probe()
            except OSError:
                if self._fd >= 0:
                    os.close(self._fd)
                self._fd = -1
                if mode == "direct":
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
            self.mode = "buffered"
        self.bytes_read = 0

    def _probe(self) -> None:
        buf = aligned_buffer(ALIGN, huge=False)
        os.preadv(self._fd, [buf], 0)

    def read_bytes(self, bits: int) -> int:
        """Bytes one read of a ``bits``-bit expert transfers (rounded to whole 4 KiB blocks)."""
        return _round_up(self.index.layout.prefix_bytes(bits))

    def read(self, layer: int, expert: int, bits: int, buf: np.ndarray) -> np.ndarray:
        """Read the ``bits``-bit prefix of one record into ``buf`` (aligned, >= read_bytes(bits))."""
        n = self.read_bytes(bits)
        view = buf[:n]
        off = self.index.offset(layer, expert)
        got = os.preadv(self._fd, [view], off)
        if got < self.index.layout.prefix_bytes(bits):
            raise BundleError(f"expert store {self.path.name}: short read for layer {layer} expert {expert} "
                              f"({got:,} of {n:,} bytes)")
        if self.mode == "buffered":
            os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)
        self.bytes_read += n
        self._verify(layer, expert, bits, view)
        return view

    def _verify(self, layer: int, expert: int, bits: int, data: np.ndarray) -> None:
        ends = section_ends(self.index.layout)[: bits - MIN_BITS + 1]
        want = self.index.crcs[layer * self.index.n_experts + expert]
        start = 0
        for i, end in enumerate(ends):
            if zlib.crc32(data[start:end]) != want[i]:
                raise BundleError(f"expert record for layer {layer} expert {expert} is corrupted "
                                  f"(checksum mismatch in section {i} of {self.path.name}); refusing to use it")
            start = end

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
