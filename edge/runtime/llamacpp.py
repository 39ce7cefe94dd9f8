"""llama.cpp backend (llama-cpp-python): GGUF files run whole, memory-mapped, with ggml's kernels."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

log = logging.getLogger(__name__)
_log_callback = None  # the ctypes callback must outlive every llama.cpp call


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines to Python logging (DEBUG) instead of stderr.

    Called before edge first uses llama.cpp, never at import. ``edge --debug`` shows them."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _forward(level, text, user_data):  # noqa: ARG001
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip())

    _log_callback = _forward
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaCppBackend:
    """Owns one ``llama_cpp.Llama``; exposes next-token logits for the shared generation loop."""

    name = "llamacpp"

    def __init__(self, gguf_path: Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 all_logits: bool = False):
        import llama_cpp

        route_llama_logs()
        self._lib = llama_cpp
        threads = n_threads or max(1, os.cpu_count() or 1)
        try:
            self.llama = llama_cpp.Llama(
                model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                logits_all=all_logits, verbose=False,
            )
        except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file")
            raise EdgeError(f"llama.cpp could not load {gguf_path.name}: {e}") from None
        self.n_ctx = self.llama.n_ctx()
        self.n_vocab = self.llama.n_vocab()
        self._all_logits = all_logits

    @property
    def n_past(self) -> int:
        return self.llama.n_tokens

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if self.llama.n_tokens + len(tokens) > self.n_ctx:
            raise EdgeError(f"context full: {self.llama.n_tokens} + {len(tokens)} tokens exceed n_ctx {self.n_ctx}")
        self.llama.eval(list(tokens))
        ptr = self._lib.llama_get_logits_ith(self.llama._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every token (needs ``all_logits=True``): perplexity measurement."""
        if not self._all_logits:
            raise RuntimeError("construct with all_logits=True to read every position's logits")
        start = self.llama.n_tokens
        self.llama.eval(list(tokens))
        return np.array(self.llama.scores[start : start + len(tokens)], dtype=np.float32)

    def truncate(self, n: int) -> None:
        # Llama.eval drops cache cells from n_tokens on before decoding the next batch.
        self.llama.n_tokens = max(0, min(n, self.llama.n_tokens))

    def close(self) -> None:
        if getattr(self, "llama", None) is not None:
            self.llama.close()
            self.llama = None
