"""Local routing consistency of a routing trace: SRP and SCH, as moe-lrc defines them.

"Not All Models Suit Expert Offloading" (Liang et al., code ljcleo/moe-lrc). For one layer's trace
ids [T, K] over E experts and a window of m tokens (stride 1):

* SRP, segment routing best performance: each window predicts the experts used >= theta times in
  it. With M = activations covered by predicted experts, P = m * (predicted (window, expert)
  pairs), A = K * m * windows: F1(theta) = 2M / (P + A), SRP = max over theta in 0..m
  (moe-lrc src/30_srp_calc.py and 31_srp_refine.py).
* SCH, segment cache best hit rate: a C-slot cache that evicts the expert with the fewest uses in
  the next m tokens (the current token included), ties to the least recently used. All C in one
  pass (Mattson's stack algorithm: this priority does not depend on C, so a C-slot cache always
  holds the top C of one stack). A token's K experts are looked up against the cache as it was
  before the token, then inserted in router order. moe-lrc (src/41_sch_calc.py) counts a first
  access as a hit while the cache has a free slot; ``cold=True`` counts every first access as a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOWS = (4, 16, 64, 256)


def srp(ids: np.ndarray, n_experts: int, m: int) -> tuple[float, int]:
    """(best F1, best threshold theta) for one layer's ids [T, K]; nan when T < m."""
    T, K = ids.shape
    if T < m:
        return float("nan"), 0
    onehot = np.zeros((T + 1, n_experts), dtype=np.int32)
    np.add.at(onehot[1:], (np.repeat(np.arange(T), K), ids.ravel()), 1)
    csum = np.cumsum(onehot, axis=0)
    counts = csum[m:] - csum[:-m]  # [W, E]: uses of each expert in each window
    hist = np.bincount(counts.ravel(), minlength=m + 1).astype(np.float64)  # pairs with count c
    c = np.arange(m + 1, dtype=np.float64)
    covered = np.cumsum((c * hist)[::-1])[::-1]  # M(theta) = sum_{c >= theta} c * hist[c]
    predicted = m * np.cumsum(hist[::-1])[::-1]  # P(theta)
    actual = covered[0]  # A = K * m * W
    f1 = 2 * covered / np.maximum(predicted + actual, 1)
    best = int(np.argmax(f1))
    return float(f1[best]), best


def sch(ids: np.ndarray, n_experts: int, m: int, *, cold: bool = False) -> np.ndarray:
    """Hit rate of the future-frequency cache for every size C = 1..E, [E]."""
    T, K = ids.shape
    future = np.zeros(n_experts, dtype=np.int64)  # uses in tokens [t, t + m)
    for t in range(min(m, T)):
        np.add.at(future, ids[t], 1)
    last_use = np.zeros(n_experts, dtype=np.int64)
    stack: list[int] = []  # a C-slot cache holds stack[:C]
    hits_at_depth = np.zeros(n_experts + 1, dtype=np.int64)
    seen, clock = 0, 0
    for t in range(T):
        batch = [int(x) for x in ids[t]]
        depths = [stack.index(x) if x in stack else -1 for x in batch]  # state before the token
        for d in depths:
            if d >= 0:
                hits_at_depth[d] += 1
            else:
                if not cold:
                    hits_at_depth[seen] += 1  # a hit for every cache larger than what was seen
                seen += 1
        for x in batch:
            d = stack.index(x) if x in stack else len(stack)
            if d == len(stack):
                stack.append(x)
            carry = stack[0]
            stack[0] = x
            for i in range(1, d + 1):  # keep the higher-priority item, carry the lower one down
                if i == d:
                    stack[i] = carry
                    break
                y = stack[i]
                if (future[carry], last_use[carry]) > (future[y], last_use[y]):
                    stack[i], carry = carry, y
            clock += 1
            last_use[x] = clock
            future[x] -= 1
        if t + m < T:
            np.add.at(future, ids[t + m], 1)
    return np.cumsum(hits_at_depth[:n_experts]) / max(1, T * K)


@dataclass(frozen=True)
class LocalityReport:
    n_experts: int
    top_k: int
    windows: tuple[int, ...]
    srp: np.ndarray  # [L, len(windows)] best F1 per layer and window
    sch: np.ndarray  # [L, len(windows), E] hit rate for C = 1..E (free-slot convention)
    sch_cold: np.ndarray  # [L, len(windows), E] the same, first accesses counted as misses
    hotness: np.ndarray  # [L, E] share of activations

    def sch_mean(self, cold: bool = False) -> np.ndarray:
        """Layer-averaged SCH, [len(windows), E]."""
        return (self.sch_cold if cold else self.sch).mean(axis=0)

    def to_dict(self) -> dict:
        return {
            "n_experts": self.n_experts, "top_k": self.top_k, "windows": list(self.windows),
            "srp_mean": dict(zip(map(str, self.windows), self.srp.mean(axis=0).round(4).tolist())),
            "srp_per_layer": self.srp.round(4).tolist(),
            "sch_mean": {str(m): row.round(4).tolist() for m, row in zip(self.windows, self.sch_mean())},
            "sch_cold_mean": {str(m): row.round(4).tolist() for m, row in zip(self.windows, self.sch_mean(True))},
            "cache_sizes": list(range(1, self.n_experts + 1)),
            "hotness": self.hotness.round(4).tolist(),
        }


def analyze(trace, windows: tuple[int, ...] = WINDOWS) -> LocalityReport:
    """SRP and SCH of every layer of a RoutingTrace, for each window length."""
    L, E = trace.n_layers, trace.n_experts
    srp_v = np.zeros((L, len(windows)))
    sch_v = np.zeros((L, len(windows), E))
    sch_c = np.zeros((L, len(windows), E))
    for i in range(L):
        ids = trace.layer(i)
        for j, m in enumerate(windows):
            srp_v[i, j] = srp(ids, E, m)[0]
            sch_v[i, j] = sch(ids, E, m)
            sch_c[i, j] = sch(ids, E, m, cold=True)
    return LocalityReport(E, trace.top_k, tuple(windows), srp_v, sch_v, sch_c, trace.hotness())
