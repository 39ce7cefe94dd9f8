"""A BitStack stack on disk and in memory: "the first N blocks" is one contiguous read, and the
blocks loaded are the only copy of the stacked matrices the process holds.

File layout (``dense.stack`` in an offload bundle): the activation scales of every matrix
(float32, matrix order), zero-padded to 4 KiB, then every block in global stack order, each
``block_bytes(shape, k)`` bytes (packed signs, A fp16, B fp16: :class:`edge.quant.bitstack.Block`).
The manifest keeps the :class:`StackIndex`: matrices, order, and a compression table.

In memory the loaded prefix lives in one private anonymous mapping as large as the whole stack,
of which only the loaded prefix is ever touched: growing reads the next blocks into it with one
``preadv``; shrinking drops the views of the blocks it unloads and returns their pages to the
kernel (``MADV_DONTNEED``), so the process's RSS follows the loaded size. Numpy only.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import BundleError, EdgeError
from edge.memory import anonymous_map
from edge.quant.bitstack import Block, Ordered, block_bytes, levels_at, reconstruct
from edge.units import format_bytes

PAGE = mmap.PAGESIZE
HEADER_ALIGN = 4096
TABLE_POINTS = 16  # compression table entries between the smallest and the full stack


@dataclass(frozen=True)
class StackIndex:
    """Where every block of a stack is: matrices (layer, field, rows, cols), rank k, global order."""

    k: int
    matrices: tuple[tuple[int, str, int, int], ...]
    order: tuple[tuple[int, int], ...]  # (matrix, level) in stack order
    blocks_offset: int  # file offset of the first block (after the scales)
    ends: tuple[int, ...] = field(default=(), compare=False)  # end of block i, relative to blocks_offset

    def __post_init__(self) -> None:
        if not self.ends:
            sizes = [block_bytes(self.matrices[j][2:], self.k) for j, _ in self.order]
            object.__setattr__(self, "ends", tuple(np.cumsum(sizes, dtype=np.int64).tolist()))

    @property
    def n_blocks(self) -> int:
        return len(self.order)

    @property
    def min_blocks(self) -> int:
        """Every matrix keeps one block: a stack without any is an all-zero matrix."""
        return len(self.matrices)

    @property
    def full_bytes(self) -> int:
        return self.ends[-1] if self.ends else 0

    def bytes_at(self, n: int) -> int:
        """Bytes the first ``n`` blocks take."""
        return self.ends[n - 1] if n > 0 else 0

    def blocks_within(self, nbytes: int) -> int:
        """The most blocks whose bytes fit in ``nbytes`` (may be below ``min_blocks``)."""
        return bisect.bisect_right(self.ends, nbytes)

    def table(self, points: int = TABLE_POINTS) -> list[dict]:
        """The compression table: stack sizes from the smallest to the full one -> blocks per matrix."""
        lo, hi = self.min_blocks, self.n_blocks
        ns = sorted({lo + round(i * (hi - lo) / points) for i in range(points + 1)})
        order = [Ordered(j, lv) for j, lv in self.order]
        return [{"blocks": n, "bytes": self.bytes_at(n), "per_matrix": levels_at(order, n, len(self.matrices))}
                for n in ns]

    def to_dict(self) -> dict:
        return {"k": self.k, "blocks_offset": self.blocks_offset,
                "matrices": [list(m) for m in self.matrices], "order": [list(o) for o in self.order],
                "table": self.table()}

    @classmethod
    def from_dict(cls, d: dict) -> "StackIndex":
        try:
            return cls(int(d["k"]), tuple((int(a), str(b), int(c), int(e)) for a, b, c, e in d["matrices"]),
                       tuple((int(j), int(lv)) for j, lv in d["order"]), int(d["blocks_offset"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest 'bitstack' entry is malformed ({e})") from None

    @property
    def file_bytes(self) -> int:
        return self.blocks_offset + self.full_bytes


def write_stack(path: Path, matrices: Sequence[tuple[int, str, int, int]], scales: Sequence[np.ndarray],
                blocks: Sequence[Sequence[Block]], order: Iterable[Ordered], k: int) -> StackIndex:
    """Write scales and blocks (``blocks[j][level]``) in global ``order``; returns the index."""
    order = [(o.matrix, o.level) for o in order]
    head = b"".join(np.ascontiguousarray(s, np.float32).tobytes() for s in scales)
    offset = -(-len(head) // HEADER_ALIGN) * HEADER_ALIGN
    with open(path, "wb") as f:
        f.write(head + bytes(offset - len(head)))
        for j, lv in order:
            blk = blocks[j][lv]
            if blk.shape != tuple(matrices[j][2:]):
                raise ValueError(f"block {lv} of matrix {j} has shape {blk.shape}, expected {matrices[j][2:]}")
            f.write(blk.to_bytes())
    return StackIndex(k, tuple(tuple(m) for m in matrices), tuple(order), offset)


class LoadedStack:
    """The loaded prefix of a stack: resize between ``min_blocks`` and all blocks; reconstruct a
    matrix from its loaded blocks. ``resize`` and ``reconstruct`` may be called from different
    threads (a lock orders them)."""

    def __init__(self, path: Path, index: StackIndex):
        self.path, self.index = Path(path), index
        size = self.path.stat().st_size
        if size < index.file_bytes:
            raise BundleError(f"{self.path.name} is {size:,} bytes; its index needs {index.file_bytes:,}")
        self._fd = os.open(self.path, os.O_RDONLY)
        head = os.pread(self._fd, index.blocks_offset, 0)
        self.scales, at = [], 0
        for _, _, _, n in index.matrices:
            self.scales.append(np.frombuffer(head, np.float32, count=n, offset=at).copy())
            at += 4 * n
        # 4 KiB pages: a shrink gives back exactly what it unloads
        self._map = anonymous_map(max(index.full_bytes, 1), huge=False)
        self._buf = np.frombuffer(self._map, np.uint8)
        self.blocks: list[list[Block]] = [[] for _ in index.matrices]
        self.n_loaded = 0
        self._lock = threading.Lock()

    @property
    def loaded_bytes(self) -> int:
        return self.index.bytes_at(self.n_loaded)

    def resize(self, n: int) -> int:
        """Load exactly the first ``n`` blocks (clamped to min..all); returns the new count."""
        idx = self.index
        n = max(idx.min_blocks, min(idx.n_blocks, int(n)))
        with self._lock:
            cur = self.n_loaded
            if n > cur:
                lo, hi = idx.bytes_at(cur), idx.bytes_at(n)
                view, done = self._buf[lo:hi], 0
                while done < hi - lo:  # one contiguous read (looped: preadv may return short)
                    got = os.preadv(self._fd, [view[done:]], idx.blocks_offset + lo + done)
                    if got <= 0:
                        raise BundleError(f"{self.path.name} ended early: block bytes {lo + done:,} of {hi:,} missing")
                    done += got
                for b in range(cur, n):
                    j, level = idx.order[b]
                    if level != len(self.blocks[j]):
                        raise BundleError(f"{self.path.name}: block {level} of matrix {j} comes out of order")
                    start = idx.bytes_at(b)
                    self.blocks[j].append(Block.from_buffer(self._buf[start : idx.ends[b]], idx.matrices[j][2:], idx.k))
            elif n < cur:
                for b in range(cur - 1, n - 1, -1):
                    self.blocks[idx.order[b][0]].pop()
                keep = -(-idx.bytes_at(n) // PAGE) * PAGE  # the page holding the last kept byte stays
                if keep < len(self._map):
                    self._map.madvise(mmap.MADV_DONTNEED, keep, len(self._map) - keep)
            self.n_loaded = n
        return n

    def levels(self) -> list[int]:
        return [len(b) for b in self.blocks]

    def reconstruct(self, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """Matrix ``j`` from its loaded blocks (float32 [m, n], into ``out`` when given)."""
        _, _, m, n = self.index.matrices[j]
        with self._lock:
            return reconstruct(self.blocks[j], self.scales[j], (m, n), out)

    def close(self) -> None:
        with self._lock:
            self.blocks = [[] for _ in self.index.matrices]
            self._buf = np.empty(0, np.uint8)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view of a block; the mapping goes with it
            pass


def blocks_for_budget(index: StackIndex, room: int, what: Callable[[], str] = lambda: "") -> int:
    """Blocks that fit in ``room`` bytes; refuses when even one block per matrix does not."""
    n = index.blocks_within(room)
    if n < index.min_blocks:
        raise EdgeError(f"the dense weights' smallest BitStack size is {format_bytes(index.bytes_at(index.min_blocks))} "
                        f"(one block per matrix); {format_bytes(max(room, 0))} is left for them" + (f" ({what()})" if what() else ""))
    return n
