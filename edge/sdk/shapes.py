"""The OpenAI response shapes, built from the generation loop's pieces: ``text_completion`` and
``chat.completion`` objects, and their streamed chunks (llama-cpp-python's ``Llama`` and the OpenAI
API agree on them). Usage totals reach a stream only when asked (``include_usage``), as a last
chunk with no choices, as the OpenAI API sends them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edge.runtime.generate import Generation, Piece


def usage(stats: Generation) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


class Response:
    """One request's identity (id, creation time, model) and its builders. ``token_text`` turns a
    token id into its text, for log-probabilities (None: none were asked for)."""

    def __init__(self, model: str, kind: str, token_text: Callable[[int], str] | None = None):
        self.kind = kind  # "text_completion" or "chat.completion"
        self.token_text = token_text
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these (token, logprob, top) entries, in the request's shape."""
        if self.token_text is None:
            return None
        text = self.token_text
        if self.kind == "text_completion":
            return {"tokens": [text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [{text(a): b for a, b in top} for _, _, top in entries]}

        def item(t: int, lp: float) -> dict[str, Any]:
            return {"token": text(t), "logprob": lp, "bytes": list(text(t).encode("utf-8"))}

        return {"content": [item(t, lp) | {"top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}

    def _choice(self, text: str, reason: str | None, entries: list, *, delta: dict | None = None) -> dict[str, Any]:
        lp = self._logprobs(entries)
        if self.kind == "text_completion":
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}
        if delta is not None:
            return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}

    def whole(self, pieces: Iterable[Piece], stats: Generation) -> dict[str, Any]:
        text, reason, entries = [], None, []
        for piece in pieces:
            text.append(piece.text)
            entries += piece.logprobs
            reason = piece.finish_reason or reason
        return self._head(self.kind) | {"choices": [self._choice("".join(text), reason, entries)],
                                        "usage": usage(stats)}

    def stream(self, pieces: Iterable[Piece], stats: Generation, *, include_usage: bool = False
               ) -> Iterator[dict[str, Any]]:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        if self.kind != "text_completion":  # a chat stream opens with the role
            yield self._head(obj) | {"choices": [self._choice("", None, [], delta={"role": "assistant", "content": ""})]}
        for piece in pieces:
            if not (piece.text or piece.finish_reason):
                continue
            if self.kind == "text_completion":
                choice = self._choice(piece.text, piece.finish_reason, piece.logprobs)
            else:
                choice = self._choice("", piece.finish_reason, piece.logprobs,
                                      delta={"content": piece.text} if piece.text else {})
            yield self._head(obj) | {"choices": [choice]}
        if include_usage:
            yield self._head(obj) | {"choices": [], "usage": usage(stats)}
