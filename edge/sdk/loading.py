"""``edge.load``: a model folder, GGUF file or bundle -> a Model on the right engine."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edge.errors import EdgeError
from edge.paths import cache_dir
from edge.planned import read_plan, settings
from edge.runtime.chat import ChatTemplate
from edge.runtime.offload.options import OffloadOptions
from edge.runtime.tokenizer import HFTokenizer, LlamaCppTokenizer, Tokenizer
from edge.sdk.model import Model, parse_budget
from edge.sources import Source, hf_special_ids, hf_tokenizer_file, resolve
from edge.spec import ModelSpec

BACKENDS = ("auto", "reference", "llamacpp", "offload", "ort")


def load(model: str | os.PathLike | None = None, *, backend: str = "auto", n_ctx: int | None = None,
         n_threads: int | None = None, verify: bool = False, memory_budget: int | str | None = None,
         offload: OffloadOptions | None = None, chat_template: str | os.PathLike | None = None,
         peers: list[str] | str | None = None, ep: str | None = None) -> Model:
    """Load a model for generation.

    ``model`` is an edge bundle folder, a Hugging Face MoE checkpoint folder, a ``.gguf`` file, or
    None for the embedded default model. ``backend="auto"``: a GGUF that fits (the budget, or the
    memory free now) runs whole on llama.cpp and one that does not runs on the offload engine
    straight from the file; offload bundles run on the offload engine, everything else on the
    reference engine; ONNX bundles run on ONNX Runtime. ``backend="ort"`` runs a checkpoint or a GGUF
    on ONNX Runtime too, exported once to an int4 ONNX bundle kept in edge's cache; ``ep`` names its
    execution provider (cpu, xnnpack, qnn, coreml, openvino; default cpu). ``verify=True``
    re-hashes every bundle file. ``memory_budget`` (bytes or "300MB") bounds the whole process's memory on the offload engine; ``offload`` tunes that
    engine (OffloadOptions).

    A bundle made by ``edge deploy`` runs as its plan.json says (backend settings, cache slots,
    bits, prefetch, threads, budget, context); each argument given here overrides that one setting,
    and ``Model.notes`` says what was followed and what was overridden. ``n_ctx`` defaults to the
    plan's context, else 2048; ``n_threads`` to the plan's, else the physical cores.

    ``create_chat_completion`` lays conversations out with the model's own chat template (a GGUF's
    ``tokenizer.chat_template``, a folder's chat_template.jinja or tokenizer_config.json);
    ``chat_template`` (a Jinja template, or a file holding one) replaces it.

    ``peers`` (``host:port`` of paired `edge peer serve` agents, as a list or comma-separated, or
    ``"auto"`` for mDNS discovery) runs a GGUF (or a checkpoint's converted GGUF) across this device and those peers
    on llama.cpp's RPC backend, its layers split by measured speed, memory and links; with
    ``memory_budget`` this device holds no more than that, the other layers go to the peers.

    >>> import edge
    >>> m = edge.load()
    >>> m.spec.n_experts, m.spec.top_k
    (8, 2)
    >>> m.close()
    """
    if backend not in BACKENDS:
        raise EdgeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    budget = parse_budget(memory_budget)
    template = _given_template(chat_template) if chat_template is not None else None  # checked before loading
    src = resolve(model)
    if ep is not None and backend not in ("auto", "ort"):
        raise EdgeError(f"--ep chooses ONNX Runtime's execution provider; --backend {backend} does not run on it")
    if backend == "ort" or ep is not None:
        m = _load_ort(src, n_ctx, n_threads, verify, ep or "cpu", budget)
    elif peers is not None:
        m = _load_across(src, backend, n_ctx, n_threads, budget, peers)
    else:
        m = _load(src, backend, n_ctx, n_threads, verify, budget, offload)
    if template is not None:  # the special tokens it may name are the model's
        template.special_tokens = dict(m.tokenizer.special_tokens)
        m.chat_template = template
    return m


def _load_ort(src: Source, n_ctx: int | None, n_threads: int | None, verify: bool, ep: str,
              budget: int | None) -> Model:
    """An ONNX bundle on ONNX Runtime; a checkpoint or GGUF is exported once to a cached int4 bundle."""
    from edge.formats.bundle import read_manifest

    if budget is not None:
        raise EdgeError("--memory-budget runs offload bundles; ONNX Runtime holds the whole model")
    notes: tuple[str, ...] = ()
    if src.kind != "bundle":
        path, made = _cached_onnx(src)
        notes = (f"{src.name} exported to an int4 ONNX bundle for ONNX Runtime "
                 f"{'now' if made else 'earlier'}, kept at {path}",)
        src = Source(kind="bundle", path=path, label=src.name)
    manifest = read_manifest(src.path)
    if manifest.format != "onnx":
        raise EdgeError(f"{src.path} is a {manifest.format} bundle; ONNX Runtime runs onnx bundles "
                        f"(edge build MODEL --format onnx -o DIR)")
    return _load_bundle(src, "ort", n_ctx, n_threads, verify, None, None, ep=ep, notes=notes)


def _source_key(src: Source) -> str:
    """What a conversion of ``src`` kept in the cache is keyed by: its weight and config files' names,
    sizes and modification times (a checkpoint folder's, or the GGUF file's own)."""
    h = hashlib.sha256()
    for p in sorted(src.path.iterdir()) if src.path.is_dir() else [src.path]:
        if p.suffix in (".json", ".safetensors", ".gguf"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _cached_onnx(src: Source) -> tuple[Path, bool]:
    """An int4 ONNX bundle of a checkpoint or GGUF, built once into edge's cache (_source_key);
    (its path, whether it was built now)."""
    from edge.builder.bundles import build
    from edge.builder.onnx_graph import current

    target = cache_dir("onnx") / f"{src.name}-{_source_key(src)}-int4"
    if current(target):
        return target, False
    import logging

    logging.getLogger("edge").warning(f"exporting {src.name} to an int4 ONNX bundle for ONNX Runtime, once (about 2 "
                                      f"minutes per 4 GB of weights here; edge build --format onnx shows progress)")
    build(src.path, target, format="onnx", weight_type="int4", force=True)
    return target, True


def _given_template(chat_template: str | os.PathLike) -> ChatTemplate:
    """load's ``chat_template``: a Jinja template, or a file holding one."""
    text = os.fspath(chat_template)
    if "{" in text:
        return ChatTemplate(text, origin="the chat_template argument")
    path = Path(text)
    if not path.is_file():
        raise EdgeError(f"chat template {text}: no such file (give a Jinja template or a file holding one)")
    return ChatTemplate(path.read_text(encoding="utf-8"), origin=str(path))


def _load(src: Source, backend: str, n_ctx: int | None, n_threads: int | None, verify: bool, budget: int | None,
          offload: OffloadOptions | None) -> Model:
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


def _load_across(src: Source, backend: str, n_ctx: int | None, n_threads: int | None, budget: int | None,
                 peers: list[str] | str) -> Model:
    from edge.sdk.group import load_group

    if backend not in ("auto", "llamacpp"):
        raise EdgeError(f"a model run across peers runs on llama.cpp's RPC backend; --backend {backend} does not apply")
    if src.kind == "gguf":
        path = src.path
    elif src.kind == "hf":
        path = _cached_gguf(src)
    else:
        return _load_bundle(src, backend, n_ctx, n_threads, False, budget, None, peers=peers)
    return load_group(path, src.name, peers, n_ctx=n_ctx or 2048, n_threads=n_threads, budget=budget)


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
    model = Model(name=src.name, spec=spec, backend=engine, tokenizer=LlamaCppTokenizer(vocab, src.path.name), source=src.path,
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
        return Model(name=name, spec=spec, backend=engine, tokenizer=LlamaCppTokenizer(vocab, path.name), source=path, notes=notes)
    be = LlamaCppBackend(path, n_ctx=min(n_ctx, spec.context_length), n_threads=n_threads)
    tok: Tokenizer = LlamaCppTokenizer(be.model, path.name)
    if hf_dir is not None:
        tok = HFTokenizer(hf_tokenizer_file(hf_dir), eos)
    return Model(name=name, spec=spec, backend=be, tokenizer=tok, source=path, notes=notes)


def _load_bundle(src: Source, backend: str, n_ctx: int | None, n_threads: int | None, verify: bool,
                 budget: int | None, offload: OffloadOptions | None, peers: list[str] | str | None = None,
                 ep: str = "cpu", notes: tuple[str, ...] = ()) -> Model:
    from edge.formats.bundle import read_manifest, verify_bundle

    manifest = read_manifest(src.path)
    verify_bundle(src.path, manifest, full=verify)
    plan = read_plan(src.path)
    run = settings(plan, n_ctx=n_ctx, threads=n_threads, budget=budget, offload=offload)
    weights_path = src.path / manifest.weights_file().path
    if peers is not None or (plan is not None and plan.backend == "d2d"):
        if manifest.format != "gguf":
            raise EdgeError(f"{src.path} is a {manifest.format} bundle; a model runs across peers from a GGUF "
                            "(a gguf bundle, a .gguf file or a checkpoint folder)")
        from edge.sdk.group import load_group

        notes = run.notes
        if peers is not None and plan is not None and plan.backend == "d2d":
            notes += (f"peers {peers if isinstance(peers, str) else ','.join(peers)} given: override the plan's "
                      f"{','.join(plan.peers)}",)
        return load_group(weights_path, manifest.name, peers if peers is not None else list(plan.peers),
                          n_ctx=run.n_ctx, n_threads=run.threads, budget=run.budget, notes=notes)
    if manifest.format == "onnx":
        if backend not in ("auto", "ort"):
            raise EdgeError(f"{src.path} is an onnx bundle; it runs on ONNX Runtime only (--backend ort)")
        if run.budget is not None:
            raise EdgeError("--memory-budget runs offload bundles; ONNX Runtime holds the whole model")
        from edge.hardware import default_threads
        from edge.runtime.ort import OrtBackend

        facts = manifest.onnx or {}
        engine = OrtBackend(weights_path, manifest.spec, n_ctx=run.n_ctx, max_context=facts.get("max_context", 2048),
                            n_threads=run.threads or default_threads(), ep=ep)
        return Model(name=manifest.name, spec=manifest.spec, backend=engine,
                     tokenizer=_bundle_tokenizer(src.path, manifest), source=src.path, notes=notes + run.notes)
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

        tok = LlamaCppTokenizer(load_model(bundle / manifest.tokenizer.file, vocab_only=True), bundle.name)
        tok.eos_ids |= frozenset(manifest.tokenizer.eos_ids)
        return tok
    return HFTokenizer(bundle / manifest.tokenizer.file, manifest.tokenizer.eos_ids)


def _cached_gguf(src: Source) -> Path:
    """An f32 GGUF of a checkpoint, converted once and kept in the cache (keyed by content)."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights

    target = cache_dir("gguf") / f"{src.name}-{_source_key(src)}-f32.gguf"
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
