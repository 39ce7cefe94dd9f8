"""``Model``: a loaded model with OpenAI-shaped completions and chat completions."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from edge.runtime.chat import ChatTemplate
from edge.runtime.generate import Backend, Generation, SamplingParams, Session
from edge.runtime.tokenizer import Tokenizer
from edge.spec import ModelSpec
from edge.sdk.shapes import Response
from edge.units import parse_bytes

log = logging.getLogger(__name__)


def parse_budget(budget: int | str | None) -> int | None:
    if budget is None or isinstance(budget, int):
        return budget
    try:
        return parse_bytes(budget)
    except ValueError as e:
        raise EdgeError(f"memory budget: {e}") from None


def _run_hooks(hooks: list) -> None:
    """Run and forget a model's closing hooks, each once."""
    while hooks:
        hook = hooks.pop()
        try:
            hook()
        except OSError as e:  # a full disk must not lose the user's output
            log.warning("could not save %s: %s", getattr(hook, "__qualname__", hook), e)


class Model:
    """A loaded model. Use as a context manager, or call ``close()``.

    >>> import edge
    >>> with edge.load() as m:
    ...     out = m.create_completion("def fibonacci(", max_tokens=8, temperature=0)
    >>> out["object"], out["choices"][0]["finish_reason"]
    ('text_completion', 'length')
    """

    def __init__(self, *, name: str, spec: ModelSpec, backend: Backend, tokenizer: Tokenizer, source: Path,
                 notes: tuple[str, ...] = (), chat_template: ChatTemplate | None = None):
        self.name, self.spec, self.source = name, spec, source
        # None: the model has none (create_chat_completion says so)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.backend, self.tokenizer = backend, tokenizer
        self.notes = notes  # what a deployed bundle's plan set and what the caller overrode, one line each
        self._session = Session(backend, tokenizer)
        self._elastic = None
        self._on_close: list = []  # e.g. saving the routing seen in use (edge/routing.py)
        # a model never closed still runs them when the process exits (or the model is collected)
        weakref.finalize(self, _run_hooks, self._on_close)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def metrics(self) -> dict[str, Any]:
        """Telemetry of the engine: speed, memory, and for the offload engine cache and I/O counters."""
        if hasattr(self.backend, "metrics"):
            return self.backend.metrics()
        import psutil

        return {"engine": self.backend.name, "resident_bytes": psutil.Process().memory_info().rss}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def create_completion(self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.8,
                          top_p: float = 0.95, top_k: int = 0, seed: int | None = None,
                          stop: str | list[str] | None = None, stream: bool = False,
                          stream_options: dict | None = None, logprobs: int | None = None, cancel=None
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete ``prompt``; returns an OpenAI ``text_completion`` dict, or an iterator of
        chunks of that shape when ``stream=True`` (with ``stream_options={"include_usage": True}``
        a last chunk with no choices carries the token counts). ``temperature=0`` decodes greedily.
        ``logprobs=N`` (0..20) adds each token's log-probability and the N most likely alternatives.
        ``cancel`` (a threading.Event) ends the generation before the next token once set
        (finish_reason "cancelled"): a server stops a request whose client went away.

        >>> import edge
        >>> with edge.load() as m:
        ...     for chunk in m.create_completion("import ", max_tokens=4, stream=True, seed=1):
        ...         _ = chunk["choices"][0]["text"]
        """
        return self._respond(Response(self.name, "text_completion", self._token_text if logprobs is not None else None),
                             prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream, stream_options,
                             logprobs, cancel)

    __call__ = create_completion

    def create_chat_completion(self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None,
                               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int | None = None,
                               stop: str | list[str] | None = None, stream: bool = False,
                               stream_options: dict | None = None, template_kwargs: dict | None = None,
                               logprobs: bool = False, top_logprobs: int = 0, cancel=None
                               ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation (OpenAI ``messages``: dicts with ``role`` and ``content``), laid out
        by the model's own chat template; returns a ``chat.completion`` dict, or an iterator of
        ``chat.completion.chunk`` dicts when ``stream=True``. Generation ends at the model's
        end-of-turn tokens, a stop string, ``max_tokens`` (default: what the context has room for)
        or a full context. ``template_kwargs`` reach the template as variables (e.g. Qwen3's
        ``{"enable_thinking": False}``). The conversation's tokens stay cached: the next call with
        this conversation plus a reply reads only the new turn. ``logprobs=True`` adds each token's
        log-probability, with ``top_logprobs`` (0..20) alternatives.

        >>> import edge
        >>> with edge.load() as m:
        ...     r = m.create_chat_completion([{"role": "user", "content": "sort a list"}], max_tokens=8, seed=0)
        >>> r["object"], r["choices"][0]["message"]["role"]
        ('chat.completion', 'assistant')
        """
        if self.chat_template is None:
            raise EdgeError(f"{self.name} has no chat template (a GGUF's tokenizer.chat_template, a model folder's "
                            f"chat_template.jinja or tokenizer_config.json): give one with "
                            f"edge.load(..., chat_template=FILE), or complete plain text with create_completion")
        text = self.chat_template.render(messages, add_generation_prompt=True, **(template_kwargs or {}))
        ids = self.tokenizer.encode_special(text)
        if max_tokens is None:
            max_tokens = max(0, self.backend.n_ctx - len(ids))
        return self._respond(Response(self.name, "chat.completion", self._token_text if logprobs else None), ids,
                             max_tokens, temperature, top_p, top_k, seed, stop, stream, stream_options,
                             top_logprobs if logprobs else None, cancel)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _respond(self, response: Response, prompt: str | list[int], max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, stop: str | list[str] | None, stream: bool,
                 stream_options: dict | None, logprobs: int | None, cancel) -> dict[str, Any] | Iterator[dict[str, Any]]:
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise EdgeError(f"logprobs must be 0..20, got {logprobs}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stats = Generation()
        pieces = self._session.generate(prompt, max_tokens=max_tokens, sampling=sampling, stop=stops, stats=stats,
                                        logprobs=logprobs, cancel=cancel)
        if stream:
            return response.stream(pieces, stats, include_usage=bool((stream_options or {}).get("include_usage")))
        return response.whole(pieces, stats)

    def set_memory_budget(self, budget: int | str, *, reason: str = "set_memory_budget") -> dict[str, Any]:
        """Fit the running model into ``budget`` (bytes or "300MB") without reloading it or losing
        the conversation: a BitStack stack grows or shrinks block by block, then the expert cache.
        The next token uses the new weights. Offload bundles only."""
        from edge.runtime.offload.budget import set_memory_budget

        nbytes = parse_budget(budget)
        if self.backend.name != "offload":
            raise EdgeError(f"the {self.backend.name} backend cannot resize while it runs; load an offload bundle "
                            "(edge build MODEL --format offload --bitstack)")
        return set_memory_budget(self.backend, nbytes, reason=reason)

    def elastic(self, *, floor: int | str | None = None, ceiling: int | str | None = None):
        """Start the elastic memory manager (edge/runtime/offload/elastic.py): the budget follows the
        memory the device has free, between ``floor`` and ``ceiling`` (default: the budget now). Stopped by
        ``close()``; returns the manager."""
        from edge.runtime.offload.elastic import ElasticManager

        if self.backend.name != "offload":
            raise EdgeError(f"the elastic memory manager resizes offload bundles; {self.source} runs on {self.backend.name}")
        if self._elastic is None:
            self._elastic = ElasticManager(self.backend, floor=parse_budget(floor), ceiling=parse_budget(ceiling)).start()
        return self._elastic

    def close(self) -> None:
        if self._elastic is not None:
            self._elastic.stop()
            self._elastic = None
        _run_hooks(self._on_close)
        self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


