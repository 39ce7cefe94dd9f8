"""The generation loop shared by every backend: prompt caching, sampling, stop strings, streaming.

A backend only turns tokens into next-token logits (``Backend``); everything a user sees about
decoding (seeded sampling, where text stops, how it streams) is decided here, once, so backends
give the same text for the same logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge.errors import EdgeError
from edge.runtime.tokenizer import Tokenizer


class Backend(Protocol):
    name: str
    n_ctx: int
    n_vocab: int
    n_past: int

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens to the context and return the logits [V] after the last one."""

    def truncate(self, n: int) -> None:
        """Keep only the first n positions of the context."""

    def close(self) -> None: ...


def checked_tokens(tokens: Sequence[int], n_past: int, n_ctx: int, n_vocab: int) -> np.ndarray:
    """A backend's eval input as int64 ids, refused when empty, not 1-D, past the context or out of
    the vocabulary."""
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("eval needs a non-empty 1-D token list")
    if n_past + len(ids) > n_ctx:
        raise EdgeError(f"context full: {n_past} + {len(ids)} tokens exceed n_ctx {n_ctx}")
    if ids.min() < 0 or ids.max() >= n_vocab:
        raise ValueError(f"token id out of range 0..{n_vocab - 1}")
    return ids


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EdgeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EdgeError(f"top_k must be >= 0, got {self.top_k}")


class Sampler:
    """Picks the next token from logits: greedy at temperature 0, else top-k / top-p sampling."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.p.temperature
        if self.p.top_k and self.p.top_k < len(z):
            kth = np.partition(z, -self.p.top_k)[-self.p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, self.p.top_p)) + 1]  # smallest set reaching top_p
            mass = np.zeros_like(probs)
            mass[keep] = probs[keep]
            probs = mass / mass.sum()
        return int(self.rng.choice(len(probs), p=probs))


@dataclass
class Piece:
    """One streamed step: new text (may be empty while bytes or a stop string are pending)."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" or "length" on the last piece
    # with logprobs asked: (token, its log-probability, the top alternatives as (token, logprob))
    # for every token whose text this piece carries
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` under ``logits`` (before temperature and truncation:
    the distribution itself), and the ``top`` most likely tokens with theirs."""
    z = logits.astype(np.float64)
    z = z - z.max()
    lse = np.log(np.exp(z).sum())
    best = np.argpartition(-z, top - 1)[:top] if 0 < top < len(z) else np.arange(len(z))[: max(top, 0)]
    best = best[np.argsort(-z[best], kind="stable")]
    return int(token), float(z[token] - lse), [(int(t), float(z[t] - lse)) for t in best]


@dataclass
class Generation:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Session:
    """A backend plus its tokenizer; reuses the KV cache for a prompt that extends the last one."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer):
        self.backend, self.tokenizer = backend, tokenizer
        self._cached: list[int] = []  # tokens whose keys/values sit in the backend's cache

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        common = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # always evaluate at least one token for logits
        self.backend.truncate(common)
        logits = self.backend.eval(prompt[common:])
        self._cached = list(prompt)
        return logits

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str] = (), stats: Generation | None = None,
                 logprobs: int | None = None, cancel=None) -> Iterator[Piece]:
        """Yield pieces of text until EOS, a stop string, max_tokens or a full context. ``logprobs``
        (0..20): each piece also carries its tokens' log-probabilities and that many alternatives.
        ``cancel`` (a threading.Event): once set, generation ends before the next token ("cancelled")."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EdgeError("the prompt is empty: give at least one character")
        if len(ids) >= self.backend.n_ctx:
            raise EdgeError(f"the prompt has {len(ids)} tokens; the context holds {self.backend.n_ctx}")
        if max_tokens < 0:
            raise EdgeError(f"max_tokens must be >= 0, got {max_tokens}")
        stats = stats if stats is not None else Generation()
        stats.prompt_tokens = len(ids)
        stops = [s for s in stop if s]
        sampler = Sampler(sampling)
        logits = self._prefill(ids)
        out: list[int] = []
        pending: list = []  # logprobs of tokens whose text is not yielded yet
        emitted = 0  # characters of the decoded completion already yielded
        reason, by_stop_string = "length", False
        while len(out) < max_tokens:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            tok = sampler(logits)
            if tok in self.tokenizer.eos_ids:
                reason = "stop"
                break
            out.append(tok)
            if logprobs is not None:
                pending.append(token_logprobs(logits, tok, logprobs))
            stats.tokens, stats.completion_tokens = out, len(out)
            text = self.tokenizer.decode(out)
            hits = [i for i in (text.find(s, max(0, emitted - len(s) + 1)) for s in stops) if i >= 0]
            if hits:
                if min(hits) > emitted:
                    yield Piece(text[emitted : min(hits)], tok, logprobs=pending)
                reason, by_stop_string = "stop", True
                break
            if not text.endswith("\ufffd"):  # never split a multi-byte character
                safe = len(text) - _held_back(text, stops)
                if safe > emitted:
                    yield Piece(text[emitted:safe], tok, logprobs=pending)
                    emitted, pending = safe, []
            if self.backend.n_past >= self.backend.n_ctx:
                break  # context full: finish as "length"
            logits = self.backend.eval([tok])
            self._cached.append(tok)
        if not by_stop_string and out:
            text = self.tokenizer.decode(out)
            if len(text) > emitted:
                yield Piece(text[emitted:], None, logprobs=pending)
        yield Piece("", None, finish_reason=reason)
