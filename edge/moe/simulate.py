"""The one simulator of expert caches: hit rates of the online policies and of Belady's oracle, and
a replay of the offload engine's cache (prefetcher included) that counts its loads per token. All of
them evict through edge/moe/policies.py, the same code the engine's cache runs.
"""

from __future__ import annotations

import numpy as np

from edge.moe.policies import POLICIES, Policy, ResidentSet


class EngineReplay:
    """One layer of the offload engine's cache, replayed on routing decisions through the engine's
    own :class:`ResidentSet`: what it loads for a prompt (every expert the prompt's tokens need, in
    groups of at most ``capacity``, as the engine prefills) and for each decoded token (first the
    prefetcher's guesses that are not resident, evicting by the policy and sparing the guesses,
    then the routed experts still missing, sparing that token's experts). A wrong guess costs a
    load and may evict an expert needed later, which a plain hit rate does not see.

    ``hits``/``misses`` count the routed experts found or not found (guesses are neither);
    ``loads`` counts every expert brought in (misses and guesses); ``events``, when kept, is one
    ``(hits, misses)`` pair per :meth:`prefill` or :meth:`decode` call."""

    def __init__(self, n_experts: int, capacity: int, policy: str, window: int = 16, *, keep_events: bool = False):
        self.capacity = capacity
        self.cache = ResidentSet(capacity, Policy(policy, n_experts, window))
        self.loads = self.hits = self.misses = 0
        self.events: list[tuple[int, int]] | None = [] if keep_events else None

    @property
    def policy(self) -> Policy:
        return self.cache.policy

    def _bring(self, e: int, spare: set[int]) -> bool:
        """Make ``e`` resident; True if it had to be loaded."""
        if e in self.cache:
            return False
        self.cache.admit(e, spare)
        self.loads += 1
        return True

    def _use(self, experts: list[int]) -> None:
        hits = misses = 0
        for start in range(0, len(experts), self.capacity):
            group = experts[start : start + self.capacity]
            for e in group:
                if self._bring(e, set(group)):
                    misses += 1
                else:
                    hits += 1
        self.hits, self.misses = self.hits + hits, self.misses + misses
        if self.events is not None:
            self.events.append((hits, misses))

    def prefill(self, ids: np.ndarray) -> None:
        """A prompt's routing ids [T, K] (the prefetcher does not guess for prompts)."""
        for t in range(len(ids)):
            self.policy.on_token(tuple(int(e) for e in ids[t]))
        self._use([int(e) for e in dict.fromkeys(np.asarray(ids).ravel().tolist())])

    def decode(self, guess, experts) -> None:
        """One decoded token: the prefetcher's guess [K] (None: prefetching off), then the routed
        experts [K]."""
        want = [] if guess is None else [int(e) for e in guess[: self.capacity]]
        for e in want:
            self._bring(e, set(want))
        routed = tuple(int(e) for e in experts)
        self.policy.on_token(routed)
        self._use(list(dict.fromkeys(routed)))


def simulate(ids: np.ndarray, n_experts: int, capacity: int, policy: str, window: int = 16) -> float:
    """Hit rate of one layer's cache on a trace ids [T, K], decoded token by token with no
    prefetcher (first accesses count as misses); ``policy="belady"``: the offline oracle."""
    T, K = ids.shape
    if policy == "belady":
        return _belady(ids, capacity)
    replay = EngineReplay(n_experts, capacity, policy, window)
    for t in range(T):
        replay.decode(None, ids[t])
    return replay.hits / max(1, T * K)


def simulate_engine(ids: np.ndarray, guesses: np.ndarray, n_experts: int, capacity: int, policy: str,
                    window: int = 16) -> float:
    """Expert loads per decoded token of one layer of the offload engine in steady use: the whole
    trace ids [T, K] decoded token by token from an empty cache, with the prefetcher's guesses [T, K]."""
    replay = EngineReplay(n_experts, capacity, policy, window)
    for t in range(len(ids)):
        replay.decode(guesses[t], ids[t])
    return replay.loads / max(1, len(ids))


def simulate_replies(ids: np.ndarray, guesses: np.ndarray | None, n_experts: int, capacity: int, policy: str,
                     prompt: int, reply: int, window: int = 16) -> float:
    """Expert loads per decoded token of one layer over short replies, as a freshly loaded engine
    serves them: the trace cut into consecutive (prompt, reply) episodes, each from an empty cache,
    its prompt prefilled and its reply decoded token by token; loads during the replies only, per
    reply token. ``guesses`` None: the engine with prefetching off (demand loads only). Where a
    cache holds nearly every expert, the warm-up after the prompt is most of a short reply's loads
    (default model, 8 slots: 0.06 loads per token vs 0.01 in steady use; at 7 slots 0.48 vs 0.44)."""
    loads = tokens = 0
    for start in range(0, len(ids) - prompt - reply + 1, prompt + reply):
        replay = EngineReplay(n_experts, capacity, policy, window)
        replay.prefill(ids[start : start + prompt])
        before = replay.loads
        for t in range(start + prompt, start + prompt + reply):
            replay.decode(None if guesses is None else guesses[t], ids[t])
        loads += replay.loads - before
        tokens += reply
    return loads / tokens if tokens else float("nan")


def policy_hit_rates(trace, capacity: int) -> dict[str, float]:
    """Layer-mean hit rate of each online policy and of Belady's oracle for a RoutingTrace."""
    names = (*POLICIES, "belady")
    return {p: float(np.mean([simulate(trace.layer(i), trace.n_experts, capacity, p)
                              for i in range(trace.n_layers)])) for p in names}


def _belady(ids: np.ndarray, capacity: int) -> float:
    """Optimal offline replacement: evict the resident expert used again farthest in the future."""
    T, K = ids.shape
    seq = [int(e) for e in ids.ravel()]
    nxt = [0] * len(seq)
    seen: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = seen.get(seq[i], len(seq) + 1)
        seen[seq[i]] = i
    resident: dict[int, int] = {}  # expert -> position of its next use
    hits = 0
    for i, e in enumerate(seq):
        if e in resident:
            hits += 1
        elif len(resident) >= capacity:
            token_start = i - i % K
            same_token = set(seq[token_start : token_start + K])
            candidates = [r for r in resident if r not in same_token] or list(resident)
            del resident[max(candidates, key=lambda r: resident[r])]
        resident[e] = nxt[i]
    return hits / max(1, T * K)
