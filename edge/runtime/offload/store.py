"""The offload engine's reader of an expert store (format: edge/quant/store.py): positioned reads
of b-bit record prefixes, checksum-verified.

Reads go through O_DIRECT where the filesystem allows it (no page cache, so the memory budget
sees only our own buffers) and otherwise through buffered reads followed by
POSIX_FADV_DONTNEED, which drops the pages again; ``mode`` picks one explicitly. Falling back
from O_DIRECT to buffered reads is logged once as a warning: it costs page-cache churn.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.memory import DIRECT_IO_ALIGN, aligned_buffer
from edge.quant.nested import MIN_BITS
from edge.quant.store import StoreIndex, read_bytes, section_ends

log = logging.getLogger(__name__)


class ExpertStore:
    """Positioned reads of b-bit expert prefixes, checksum-verified."""

    def __init__(self, path: Path, index: StoreIndex, *, mode: str = "auto"):
        self.path, self.index = Path(path), index
        size = self.path.stat().st_size
        if size < index.file_bytes:
            raise BundleError(f"expert store {self.path.name} is {size:,} bytes; its index needs {index.file_bytes:,}")
        self._fd, self.mode = open_for_reads(self.path, mode)
        self.bytes_read = 0

    def read_bytes(self, bits: int) -> int:
        """Bytes one read of a ``bits``-bit expert transfers (rounded to whole 4 KiB blocks)."""
        return read_bytes(self.index.layout, bits)

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


def open_for_reads(path: Path, mode: str) -> tuple[int, str]:
    """A descriptor for expert reads and its mode: "direct" (O_DIRECT, proved by one aligned read,
    as some file systems accept the flag and fail the read) where ``mode`` is auto or direct and the
    file system allows it; else "buffered" (said once, see :func:`warn_buffered`). ``mode`` direct
    raises instead of falling back."""
    if mode in ("auto", "direct"):
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            os.preadv(fd, [aligned_buffer(DIRECT_IO_ALIGN, huge=False)], 0)
            return fd, "direct"
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            if mode == "direct":
                raise
            warn_buffered(path, e)
    return os.open(path, os.O_RDONLY), "buffered"


_warned: set[str] = set()


def warn_buffered(path: Path, why: OSError) -> None:
    """Say once per file system that O_DIRECT was refused and reads go through the page cache."""
    key = str(path.parent.resolve())
    if key not in _warned:
        _warned.add(key)
        log.warning("O_DIRECT refused for %s (%s): expert reads go through the page cache and are dropped "
                    "after each read (slower, and the page cache briefly holds them)", path, why.strerror or why)
