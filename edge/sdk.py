"""The SDK: ``edge.load(...)`` returns a Model with OpenAI-shaped completions."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from edge.paths import cache_dir
from edge.planned import read_plan, settings
from edge.runtime.generate import Backend, Generation, SamplingParams, Session
from edge.runtime.offload.options import OffloadOptions
from edge.runtime.tokenizer import HFTokenizer, LlamaCppTokenizer, Tokenizer
from edge.sources import Source, hf_special_ids, hf_tokenizer_file, resolve
from edge.spec import ModelSpec
from edge.units import parse_bytes

__all__ = ["BACKENDS", "Model", "OffloadOptions", "load"]
log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "llamacpp", "offload")


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
                 notes: tuple[str, ...] = ()):
        self.name, self.spec, self.source = name, spec, source
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
                          stop: str | list[str] | None = None, stream: bool = False
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete ``prompt``; returns an OpenAI ``text_completion`` dict, or an iterator of
        chunks of that shape when ``stream=True``. ``temperature=0`` decodes greedily.

        >>> import edge
        >>> with edge.load() as m:
        ...     for chunk in m.create_completion("import ", max_tokens=4, stream=True, seed=1):
        ...         _ = chunk["choices"][0]["text"]
        """
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stats = Generation()
        pieces = self._session.generate(prompt, max_tokens=max_tokens, sampling=sampling, stop=stops, stats=stats)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return self._stream(pieces, cid, created, stats)
        text, reason = [], None
        for piece in pieces:
            text.append(piece.text)
            reason = piece.finish_reason or reason
        return self._result(cid, created, "".join(text), reason, stats)

    __call__ = create_completion

    def _stream(self, pieces, cid: str, created: int, stats: Generation) -> Iterator[dict[str, Any]]:
        for piece in pieces:
            if piece.text or piece.finish_reason:
                chunk = self._result(cid, created, piece.text, piece.finish_reason, stats)
                if not piece.finish_reason:
                    del chunk["usage"]
                yield chunk

    def _result(self, cid: str, created: int, text: str, reason: str | None, stats: Generation) -> dict[str, Any]:
        return {
            "id": cid, "object": "text_completion", "created": created, "model": self.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                      "total_tokens": stats.prompt_tokens + stats.completion_tokens},
        }

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


def load(model: str | os.PathLike | None = None, *, backend: str = "auto", n_ctx: int | None = None,
         n_threads: int | None = None, verify: bool = False, memory_budget: int | str | None = None,
         offload: OffloadOptions | None = None) -> Model:
    """Load a model for generation.

    ``model`` is an edge bundle folder, a Hugging Face MoE checkpoint folder, a ``.gguf`` file, or
    None for the embedded default model. ``backend="auto"``: a GGUF that fits (the budget, or the
    memory free now) runs whole on llama.cpp and one that does not runs on the offload engine
    straight from the file; offload bundles run on the offload engine, everything else on the
    reference engine. ``verify=True`` re-hashes every bundle file. ``memory_budget`` (bytes or
    "300MB") bounds the whole process's memory on the offload engine; ``offload`` tunes that
    engine (OffloadOptions).

    A bundle made by ``edge deploy`` runs as its plan.json says (backend settings, cache slots,
    bits, prefetch, threads, budget, context); each argument given here overrides that one setting,
    and ``Model.notes`` says what was followed and what was overridden. ``n_ctx`` defaults to the
    plan's context, else 2048; ``n_threads`` to the plan's, else the physical cores.

    >>> import edge
    >>> m = edge.load()
    >>> m.spec.n_experts, m.spec.top_k
    (8, 2)
    >>> m.close()
    """
    if backend not in BACKENDS:
        raise EdgeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    budget = parse_budget(memory_budget)
    src = resolve(model)
    if src.kind == "bundle":
        return _load_bundle(src, backend, n_ctx, n_threads, verify, budget, offload)
    n_ctx = n_ctx or 2048
    if src.kind == "gguf":
        return _load_gguf_file(src, backend, n_ctx, n_threads, budget, offload)
    if budget is not None or backend == "offload":
        raise EdgeError("the offload engine (and --memory-budget) runs offload bundles and GGUF files; make a bundle "
                        "with `edge build MODEL --format offload -o DIR`")
    if backend == "llamacpp":
        gguf = _cached_gguf(src)
        _, eos = hf_special_ids(src.path)
        return _load_gguf(gguf, src.name, "llamacpp", n_ctx, n_threads, eos=eos, hf_dir=src.path)
    from edge.formats.hf import load_weights

    return _reference(load_weights(src.path), src, hf_tokenizer_file(src.path), hf_special_ids(src.path)[1], n_ctx)


def _load_gguf_file(src: Source, backend: str, n_ctx: int, n_threads: int | None, budget: int | None,
                    offload: OffloadOptions | None) -> Model:
    """A GGUF file: whole on llama.cpp (or the reference engine), or on the offload engine straight
    from the file when asked to or when it does not fit (said in one note)."""
    from edge.formats.gguf_read import open_reader, read_spec

    reader = open_reader(src.path)
    spec = read_spec(src.path, reader)
    route, budget, notes = _gguf_route(src.path, reader, spec, backend, budget, n_ctx)
    del reader
    if route != "offload":
        return _load_gguf(src.path, src.name, route, n_ctx, n_threads, eos=(), notes=notes)
    from edge.hardware import default_threads
    from edge.routing import UsageRecorder, locality_of, recorded
    from edge.runtime.llamacpp import load_model
    from edge.runtime.offload.open import open_gguf

    trace = recorded(src.path)
    locality = locality_of(trace)
    if locality:
        notes += (f"expert cache spread over the layers by the routing recorded on earlier runs ({trace.n_tokens} "
                  f"tokens)",)
    engine = open_gguf(src.path, budget=budget, options=(offload or OffloadOptions()).resolved(),
                       n_ctx=min(n_ctx, spec.context_length), threads=n_threads or default_threads(),
                       locality=locality)
    try:
        vocab = load_model(src.path, vocab_only=True)
    except BaseException:
        engine.close()
        raise
    recorder = UsageRecorder(src.path, spec.n_layers, spec.n_experts)
    engine.route_observers.append(recorder)
    model = Model(name=src.name, spec=spec, backend=engine, tokenizer=LlamaCppTokenizer(vocab), source=src.path,
                  notes=notes)
    model._on_close.append(recorder.save)
    return model


def _gguf_route(path: Path, reader, spec: ModelSpec, backend: str, budget: int | None,
                n_ctx: int) -> tuple[str, int | None, tuple[str, ...]]:
    """(backend, budget, notes) for a GGUF: llama.cpp when the whole file fits the budget (or the
    memory free now), the offload engine when it does not or when asked; a budget that cannot hold
    the trunk is refused before anything is loaded."""
    from edge.memory import usable_bytes
    from edge.plan.costs import LLAMA_OVERHEAD_BYTES
    from edge.units import format_bytes

    size = path.stat().st_size
    kv16 = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * n_ctx * 2
    whole = size + kv16 + LLAMA_OVERHEAD_BYTES
    if backend in ("llamacpp", "reference"):
        if budget is not None:
            raise EdgeError(f"--memory-budget runs a GGUF on the offload engine; {backend} holds the whole file "
                            f"({format_bytes(size)})")
        return backend, None, ()
    room = budget if budget is not None else usable_bytes()
    where = f"the {format_bytes(room)} budget" if budget is not None else f"the {format_bytes(room)} free now"
    if backend == "auto" and whole <= room:
        return "llamacpp", None, (f"{path.name} fits whole in {where} ({format_bytes(whole)} with its KV cache): "
                                  f"llama.cpp runs it, memory-mapped",) if budget is not None else ()
    trunk = sum(t.n_bytes for t in reader.tensors if "_exps." not in t.name)
    kv32 = 2 * kv16  # the offload engine keeps K and V in float32
    if trunk + kv32 > room:
        raise EdgeError(f"memory budget {format_bytes(room)} is below what must stay resident: {path.name}'s dense "
                        f"weights {format_bytes(trunk)} and the KV cache for {n_ctx} tokens {format_bytes(kv32)}")
    why = (f"{path.name} ({format_bytes(size)}) does not fit whole in {where}" if backend == "auto"
           else "--backend offload")
    return "offload", room, (f"{why}: the offload engine runs it within {format_bytes(room)}, experts read from the "
                             f"file into a cache",)


def _reference(weights, src: Source, tokenizer_json: Path, eos: tuple[int, ...], n_ctx: int) -> Model:
    from edge.runtime.reference import ReferenceEngine

    engine = ReferenceEngine(weights, n_ctx=n_ctx)
    return Model(name=src.name, spec=weights.spec, backend=engine, tokenizer=HFTokenizer(tokenizer_json, eos),
                 source=src.path)


def _load_gguf(path: Path, name: str, backend: str, n_ctx: int, n_threads: int | None, *,
               eos: tuple[int, ...], hf_dir: Path | None = None, notes: tuple[str, ...] = ()) -> Model:
    from edge.formats.gguf_read import read_spec
    from edge.runtime.llamacpp import LlamaCppBackend, load_model

    spec = read_spec(path)
    if backend == "reference":
        from edge.formats.gguf_read import load_weights
        from edge.runtime.reference import ReferenceEngine

        vocab = load_model(path, vocab_only=True)
        engine = ReferenceEngine(load_weights(path), n_ctx=n_ctx)
        return Model(name=name, spec=spec, backend=engine, tokenizer=LlamaCppTokenizer(vocab), source=path, notes=notes)
    be = LlamaCppBackend(path, n_ctx=min(n_ctx, spec.context_length), n_threads=n_threads)
    tok: Tokenizer = LlamaCppTokenizer(be.model)
    if hf_dir is not None:
        tok = HFTokenizer(hf_tokenizer_file(hf_dir), eos)
    return Model(name=name, spec=spec, backend=be, tokenizer=tok, source=path, notes=notes)


def _load_bundle(src: Source, backend: str, n_ctx: int | None, n_threads: int | None, verify: bool,
                 budget: int | None, offload: OffloadOptions | None) -> Model:
    from edge.formats.bundle import read_manifest, verify_bundle

    manifest = read_manifest(src.path)
    verify_bundle(src.path, manifest, full=verify)
    run = settings(read_plan(src.path), n_ctx=n_ctx, threads=n_threads, budget=budget, offload=offload)
    weights_path = src.path / manifest.weights_file().path
    if manifest.format == "offload":
        if backend not in ("auto", "offload"):
            raise EdgeError(f"{src.path} is an offload bundle; it runs on the offload engine only")
        from edge.runtime.offload.open import open_offload

        engine = open_offload(src.path, manifest, budget=run.budget, options=run.offload, n_ctx=run.n_ctx,
                              threads=run.threads)
        tok = _bundle_tokenizer(src.path, manifest)
        return Model(name=manifest.name, spec=manifest.spec, backend=engine, tokenizer=tok, source=src.path,
                     notes=run.notes)
    if run.budget is not None:
        raise EdgeError(f"{src.path} is a {manifest.format} bundle; --memory-budget runs offload bundles")
    if manifest.format == "gguf":
        return _load_gguf(weights_path, manifest.name, "llamacpp" if backend == "auto" else backend, run.n_ctx,
                          run.threads, eos=manifest.tokenizer.eos_ids, notes=run.notes)
    if backend == "llamacpp":
        raise EdgeError(f"{src.path} is an edge-format bundle; build a gguf bundle to run it with llama.cpp")
    from edge.formats import edge_weights

    weights = edge_weights.load(weights_path, manifest.spec)
    return _reference(weights, src, src.path / manifest.tokenizer.file, manifest.tokenizer.eos_ids, run.n_ctx)


def _bundle_tokenizer(bundle: Path, manifest) -> Tokenizer:
    """A bundle's tokenizer: its tokenizer.json, or the vocabulary inside its GGUF."""
    if manifest.tokenizer.kind == "gguf":
        from edge.runtime.llamacpp import load_model

        tok = LlamaCppTokenizer(load_model(bundle / manifest.tokenizer.file, vocab_only=True))
        if manifest.tokenizer.eos_ids:
            tok.eos_ids = frozenset(manifest.tokenizer.eos_ids)
        return tok
    return HFTokenizer(bundle / manifest.tokenizer.file, manifest.tokenizer.eos_ids)


def _cached_gguf(src: Source) -> Path:
    """An f32 GGUF of a checkpoint, converted once and kept in the cache (keyed by content)."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights

    h = hashlib.sha256()
    for p in sorted(src.path.iterdir()):
        if p.suffix in (".json", ".safetensors"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = cache_dir("gguf") / f"{src.name}-{h.hexdigest()[:16]}-f32.gguf"
    if not target.is_file():
        bos, eos = hf_special_ids(src.path)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        try:
            write_gguf(load_weights(src.path), hf_tokenizer_file(src.path), tmp, outtype="f32", bos_id=bos,
                       eos_id=eos[0] if eos else None, name=src.name)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
