"""BitStack (ICLR'25): dense weight matrices as stacks of ~1-bit residual blocks, for any-size loading.

For a matrix W [m, n] whose inputs have activation scale s [n] (from calibration text), the
decomposition works on the scaled matrix W' = W diag(s), so that errors on inputs that carry large
activations cost more. Residual R_0 = W'; for i = 1..N:

    S_i = sign(R_{i-1})  (zeros count as +1)
    |R_{i-1}| ~ A_i B_i  (its best rank-k approximation: SVD, sqrt of the singular values on each side)
    R_i = R_{i-1} - S_i * (A_i B_i)

A block is (S_i packed 1 bit per weight, A_i [m, k] and B_i [k, n] in fp16): m n / 8 + 2 k (m + n)
bytes, about 1 bit per weight for the paper's k = 16. The first j blocks of a stack give
W ~ (sum_{i<=j} S_i * (A_i B_i)) diag(1 / s). Blocks of all matrices are then ordered into one
stack by importance (``order_blocks``), so that a model of any size is "the first N blocks".

Decomposition needs torch (the ``convert`` extra); unpacking and reconstruction are numpy only, so
the runtime that loads and resizes stacks stays torch-free.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

K_DEFAULT, BLOCKS_DEFAULT = 16, 16  # the paper's defaults: rank 16, 16 iterations
SCALE_EPS = 1e-3  # added to activation scales (as the paper's code does) so none is zero


@dataclass(frozen=True)
class Block:
    """One residual block of one matrix: packed signs and the rank-k factors of the magnitudes."""

    signs: np.ndarray  # uint8 [ceil(m n / 8)], row-major, bit i of byte j is weight 8 j + i; 1 = +
    a: np.ndarray  # float16 [m, k]
    b: np.ndarray  # float16 [k, n]

    @property
    def shape(self) -> tuple[int, int]:
        return self.a.shape[0], self.b.shape[1]

    @property
    def nbytes(self) -> int:
        return self.signs.nbytes + self.a.nbytes + self.b.nbytes

    def to_bytes(self) -> bytes:
        return self.signs.tobytes() + self.a.tobytes() + self.b.tobytes()

    @classmethod
    def from_buffer(cls, buf, shape: tuple[int, int], k: int) -> "Block":
        m, n = shape
        ns = block_bytes(shape, k) - 2 * k * (m + n)
        raw = np.frombuffer(buf, dtype=np.uint8, count=block_bytes(shape, k))
        return cls(raw[:ns], raw[ns : ns + 2 * m * k].view(np.float16).reshape(m, k),
                   raw[ns + 2 * m * k :].view(np.float16).reshape(k, n))

    def term(self) -> np.ndarray:
        """S * (A B) as float32 [m, n]."""
        m, n = self.shape
        signs = np.unpackbits(self.signs, count=m * n, bitorder="little").reshape(m, n)
        prod = self.a.astype(np.float32) @ self.b.astype(np.float32)
        return np.where(signs.astype(bool), prod, -prod)


def block_bytes(shape: tuple[int, int], k: int) -> int:
    m, n = shape
    return (m * n + 7) // 8 + 2 * k * (m + n)


def activation_scales(x: np.ndarray) -> np.ndarray:
    """Per-input-channel scale from calibration activations x [windows, tokens, n]: the L2 norm
    over each window's tokens, averaged over windows (BitStack's choice), plus a small epsilon."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    return (np.linalg.norm(x, axis=1).mean(axis=0) + SCALE_EPS).astype(np.float32)


def decompose(w: np.ndarray, scales: np.ndarray, *, n_blocks: int = BLOCKS_DEFAULT, k: int = K_DEFAULT,
              ) -> tuple[list[Block], list[float]]:
    """Decompose one matrix; returns its blocks and the scaled residual's squared Frobenius norm
    after 0, 1, ..., n_blocks blocks (the error the ordering proxy works from)."""
    import torch

    res = torch.from_numpy(np.asarray(w, dtype=np.float32) * scales[None, :].astype(np.float32)).double()
    m, n = res.shape
    k = min(k, m, n)
    errors = [float((res**2).sum())]
    blocks = []
    for _ in range(n_blocks):
        sign = torch.where(res >= 0, 1.0, -1.0).double()
        u, sv, vt = torch.linalg.svd(res.abs(), full_matrices=False)
        root = sv[:k].sqrt()
        a = (u[:, :k] * root).to(torch.float16)
        b = (root[:, None] * vt[:k]).to(torch.float16)
        # Subtract what will be stored (fp16 factors), so later blocks correct the rounding too.
        res = res - sign * (a.double() @ b.double())
        packed = np.packbits(sign.numpy().ravel() > 0, bitorder="little")
        blocks.append(Block(packed, a.numpy(), b.numpy()))
        errors.append(float((res**2).sum()))
    return blocks, errors


def reconstruct(blocks: Sequence[Block], scales: np.ndarray, shape: tuple[int, int] | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """W from its first blocks (float32 [m, n]); no blocks gives zeros of ``shape``."""
    if not blocks and shape is None:
        raise ValueError("reconstructing from no blocks needs the matrix shape")
    m, n = blocks[0].shape if blocks else shape
    acc = np.zeros((m, n), np.float32) if out is None else out
    acc[:] = 0
    for blk in blocks:
        acc += blk.term()
    acc /= scales[None, :]
    return acc


@dataclass(frozen=True)
class Ordered:
    """One entry of the global stack: block ``level`` (0-based) of matrix ``matrix``."""

    matrix: int
    level: int


def order_by_error(errors: Sequence[Sequence[float]], nbytes: Sequence[int], *, min_blocks: int = 1,
                   relative: bool = True) -> list[Ordered]:
    """The cheap ordering: every matrix first gets ``min_blocks`` blocks (a stack without any is
    an all-zero matrix: the model breaks, so every size keeps them); then repeatedly take the next
    block of the matrix whose next block removes the most scaled squared error per byte. Within a
    matrix the order is always its decomposition order (block i+1 corrects block i's residual).

    ``relative``: each matrix's error is divided by its scaled squared norm first, so a block is
    worth the share of its own matrix it corrects. Absolute error lets matrices with loud inputs
    take every block: on Gemma 3 270M (whose sublayer outputs are normalized again, so only
    relative error survives) that ordering was 7.7x worse in perplexity at 8.5 bits per weight
    (118.6 vs 15.4; docs/bitstack.md)."""
    if relative:
        errors = [[x / e[0] for x in e] if e[0] > 0 else list(e) for e in errors]
    order = [Ordered(j, lv) for lv in range(min_blocks) for j in range(len(errors))]
    heap = []
    for j, e in enumerate(errors):
        if len(e) > min_blocks + 1:
            heapq.heappush(heap, (-(e[min_blocks] - e[min_blocks + 1]) / nbytes[j], j, min_blocks))
    while heap:
        _, j, lv = heapq.heappop(heap)
        order.append(Ordered(j, lv))
        e = errors[j]
        if lv + 2 < len(e):
            heapq.heappush(heap, (-(e[lv + 1] - e[lv + 2]) / nbytes[j], j, lv + 1))
    return order


def order_by_loss(n_levels: Sequence[int], nbytes: Sequence[int], loss: Callable[[list[int]], float], *,
                  min_blocks: int = 1, progress: Callable[[int, int], None] | None = None) -> list[Ordered]:
    """The perplexity-guided ordering: from every matrix at ``min_blocks`` blocks, repeatedly add
    the one next block that lowers ``loss(blocks per matrix)`` (e.g. calibration perplexity) the
    most per byte, evaluating every candidate. Costs one loss evaluation per candidate per step."""
    levels = [min(min_blocks, n) for n in n_levels]
    order = [Ordered(j, lv) for lv in range(min_blocks) for j in range(len(n_levels)) if lv < n_levels[j]]
    current = loss(levels)
    total = sum(n_levels) - sum(levels)
    while True:
        best = None
        for j, n in enumerate(n_levels):
            if levels[j] >= n:
                continue
            levels[j] += 1
            after = loss(levels)
            levels[j] -= 1
            if best is None or (current - after) / nbytes[j] > best[0]:
                best = ((current - after) / nbytes[j], j, after)
        if best is None:
            return order
        _, j, current = best
        order.append(Ordered(j, levels[j]))
        levels[j] += 1
        if progress:
            progress(len(order) - len(n_levels) * min_blocks, total)


def levels_at(order: Sequence[Ordered], n: int, n_matrices: int) -> list[int]:
    """Blocks per matrix when the first ``n`` entries of the global stack are loaded."""
    levels = [0] * n_matrices
    for o in order[:n]:
        levels[o.matrix] += 1
    return levels
