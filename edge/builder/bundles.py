"""``edge build``: turn a checkpoint or GGUF into an edge bundle (format gguf or edge)."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

from edge.errors import EdgeError
from edge.formats.bundle import Manifest, Progress, TokenizerInfo, copy_tokenizer, no_progress, write_bundle
from edge.formats.gguf_write import OUTTYPES
from edge.formats.safetensors_io import read_header
from edge.sources import Source, hf_special_ids, hf_tokenizer_file, read_spec, resolve

FORMATS = ("gguf", "edge", "offload", "onnx")


def build(model: str | Path | None, out: str | Path, *, format: str = "gguf", weight_type: str | None = None,
          force: bool = False, threads: int = 2, progress: Progress | None = None, bitstack: bool = False,
          max_bits: int | None = None, calibration: Path | None = None) -> Manifest:
    """Build a bundle at ``out`` from ``model`` (None: the embedded default).

    ``format="gguf"`` makes a bundle for the llama.cpp backend (``weight_type`` f32, f16, q8_0,
    q4_0, q4_k_m, ...; default f16); ``format="edge"`` one for the reference engine (f32 or f16);
    ``format="offload"`` one for the offload engine, from a checkpoint or a GGUF, streamed one
    tensor at a time (dense weights at the engine's precision + nested expert store with
    ``max_bits`` planes, default 8, or 6 from a GGUF, + locality measured by the engine on
    ``calibration`` text, default the stdlib training split); with ``bitstack=True`` its
    attention matrices are stored as a BitStack stack that the engine loads at any size and
    resizes while it runs (needs torch, and the whole checkpoint in memory as float32).
    """
    if format not in FORMATS:
        raise EdgeError(f"unknown bundle format {format!r}; choose gguf, edge, offload or onnx")
    if bitstack and format != "offload":
        raise EdgeError("--bitstack needs --format offload (the offload engine runs BitStack stacks)")
    if bitstack and importlib.util.find_spec("torch") is None:
        raise EdgeError("building a BitStack stack needs torch: pip install -e '.[convert]'")
    src = resolve(model)
    if src.kind == "bundle":
        raise EdgeError(f"{src.path} is already a bundle; build from a checkpoint or a GGUF file")
    read_spec(src)  # validates the source before anything is written
    say = progress or no_progress
    if format == "gguf":
        wtype = weight_type or ("keep" if src.kind == "gguf" else "f16")
        if wtype not in (*OUTTYPES, "keep"):
            raise EdgeError(f"unknown GGUF weight type {wtype!r}; choose one of {', '.join(OUTTYPES)}")
        if src.kind == "gguf" and wtype != "keep":
            raise EdgeError("a GGUF source is bundled as it is; omit --type (re-quantizing a GGUF loses accuracy)")
    elif format == "onnx":
        from edge.builder.onnx_graph import TYPES, check_shape

        wtype = weight_type or "int4"
        if wtype not in TYPES:
            raise EdgeError(f"ONNX bundles hold int4, int8 or f32 weights, not {wtype!r}")
        why = check_shape(read_spec(src), wtype)
        if why:
            raise EdgeError(f"{src.name} cannot be exported at {wtype}: {why} (--type f32 has no blocks)")
    elif format == "offload":
        wtype = "nested"
        if weight_type not in (None, "nested"):
            raise EdgeError("offload bundles always hold nested 2..8-bit experts; omit --type")
        if bitstack and src.kind != "hf":
            raise EdgeError("BitStack stacks are built from Hugging Face checkpoints (they calibrate in float32)")
        max_bits = max_bits if max_bits is not None else (6 if src.kind == "gguf" else 8)
        if not 2 <= max_bits <= 8:
            raise EdgeError(f"--max-bits must be 2..8, got {max_bits}")
        if calibration is not None and not Path(calibration).is_file():
            raise EdgeError(f"--calibration {calibration}: no such text file")
    else:
        wtype = weight_type or "f32"
        if wtype not in ("f32", "f16"):
            raise EdgeError(f"edge-format bundles hold f32 or f16 weights, not {wtype!r}")
        if src.kind != "hf":
            raise EdgeError("edge-format bundles are built from Hugging Face checkpoints (they need tokenizer.json)")

    def populate(tmp: Path) -> dict:
        if format == "gguf":
            return _populate_gguf(src, tmp, wtype, threads, say)
        if format == "offload" and bitstack:
            from edge.builder.offload import populate_offload
            from edge.formats.hf import load_weights

            _fits_in_memory(src, say)
            say("reading checkpoint")
            bos, eos = hf_special_ids(src.path)
            return populate_offload(load_weights(src.path), hf_tokenizer_file(src.path), tmp, say, eos, bos,
                                    src.name, str(src.path.resolve()), bitstack=bitstack)
        if format == "offload":
            return _populate_streaming(src, tmp, say, max_bits, calibration)
        if format == "onnx":
            return _populate_onnx(src, tmp, wtype, say)
        return _populate_edge(src, tmp, wtype, say)

    return write_bundle(Path(out), force=force, populate=populate, progress=say)


def _populate_streaming(src: Source, tmp: Path, say: Progress, max_bits: int, calibration: Path | None) -> dict:
    from edge.builder.sources import GGUFSource, HFSource
    from edge.builder.streaming import populate

    if src.kind == "gguf":
        from edge.runtime.llamacpp import load_model

        source = GGUFSource(src.path)  # first: it names a tensor of a type edge does not compute
        try:
            vocab = load_model(src.path, vocab_only=True)
        except BaseException:
            source.close()
            raise
        eos, bos, tok = (int(vocab.token_eos()),), int(vocab.token_bos()), None
        vocab.close()
    else:
        source = HFSource(src.path)
        bos, eos = hf_special_ids(src.path)
        tok = hf_tokenizer_file(src.path)
    try:
        return populate(source, tmp, say, name=src.name, origin=str(src.path.resolve()), max_bits=max_bits, eos=eos,
                        bos=bos, tokenizer_json=tok, calibration=calibration)
    finally:
        source.close()


def _populate_onnx(src: Source, tmp: Path, wtype: str, say: Progress) -> dict:
    """model.onnx + model.onnx.data written from the source one tensor (one expert) at a time, and
    the tokenizer: a checkpoint's tokenizer files, or a GGUF's vocabulary as a tensor-less GGUF."""
    from edge.builder.onnx_graph import write_onnx
    from edge.builder.sources import open_source

    if importlib.util.find_spec("onnx_ir") is None:
        raise EdgeError("building an ONNX bundle needs onnx-ir: pip install -e '.[onnx]'")
    source = open_source(src.path, src.kind)
    try:
        if src.kind == "gguf":
            say(f"{src.path.name} is stored in {source.spec.weight_dtype}: its weights are dequantized and quantized "
                f"again to {wtype} (ONNX Runtime computes no ggml types)")
        facts = write_onnx(source, tmp, wtype, progress=say)
        roles = {"model.onnx": "weights", "model.onnx.data": "weights"}
        if src.kind == "gguf":
            from edge.formats.gguf_stream import GGUF_ARCH, copy_metadata, write_streaming

            write_streaming(tmp / "tokenizer.gguf", GGUF_ARCH[source.spec.arch],
                            lambda w: copy_metadata(w, source.reader), [])
            tok = TokenizerInfo(kind="gguf", file="tokenizer.gguf", eos_ids=(), bos_id=None)
            roles["tokenizer.gguf"] = "tokenizer"
        else:
            roles |= copy_tokenizer(hf_tokenizer_file(src.path), tmp)
            bos, eos = hf_special_ids(src.path)
            tok = TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=eos, bos_id=bos)
    finally:
        source.close()
    size = (tmp / "model.onnx.data").stat().st_size
    expert = _onnx_expert_bytes(source.spec, wtype)
    spec = replace(source.spec, expert_bytes=expert, dense_bytes=size - expert, weight_dtype=wtype.upper(),
                   source_format="onnx")
    return {"name": src.name, "format": "onnx", "weight_type": wtype, "source": str(src.path.resolve()),
            "spec": spec, "tokenizer": tok, "roles": roles, "onnx": facts}


def _onnx_expert_bytes(spec, wtype: str) -> int:
    """Bytes of the routed experts in an ONNX bundle: codes plus per-block (or per-row) scales and zero points."""
    from edge.builder.onnx_graph import BLOCK

    L, E, F, D = spec.n_layers, spec.n_experts, spec.expert_ffn_size, spec.hidden_size
    weights = 3 * F * D
    if wtype == "f32":
        return L * E * weights * 4
    if wtype == "int8":
        return L * E * (weights + 5 * (2 * F + D))
    zeros = 2 * F * ((D // BLOCK + 1) // 2) + D * ((F // BLOCK + 1) // 2)  # two 4-bit zero points a byte
    return L * E * (weights // 2 + 3 * F * D // BLOCK * 4 + zeros)


def _fits_in_memory(src: Source, say: Progress) -> None:
    """The BitStack path holds the checkpoint as float32: refuse one that cannot fit."""
    from edge.memory import usable_bytes
    from edge.units import format_bytes

    spec = read_spec(src)
    need = 4 * spec.total_params
    if need > 0.8 * usable_bytes():
        raise EdgeError(f"--bitstack holds the whole checkpoint as float32 ({format_bytes(need)}); "
                        f"{format_bytes(usable_bytes())} is free (build without --bitstack: it streams)")


def _populate_gguf(src: Source, tmp: Path, wtype: str, threads: int, say: Progress) -> dict:
    from edge.formats.gguf_read import read_spec as gguf_spec

    target = tmp / "model.gguf"
    if src.kind == "gguf":
        say(f"copying {src.path.name}")
        shutil.copyfile(src.path, target)
        wtype = gguf_spec(src.path).weight_dtype.lower()
        bos, eos = None, ()
    else:
        from edge.formats.gguf_write import write_gguf
        from edge.formats.hf import load_weights

        say("reading checkpoint")
        weights = load_weights(src.path)
        bos, eos = hf_special_ids(src.path)
        say(f"writing GGUF ({wtype})")
        write_gguf(weights, hf_tokenizer_file(src.path), target, outtype=wtype, bos_id=bos,
                   eos_id=eos[0] if eos else None, name=src.name, threads=threads)
    return {
        "name": src.name, "format": "gguf", "weight_type": wtype, "source": str(src.path.resolve()),
        "spec": gguf_spec(target),
        "tokenizer": TokenizerInfo(kind="gguf", file="model.gguf", eos_ids=eos, bos_id=bos),
        "roles": {"model.gguf": "weights"},
    }


def _populate_edge(src: Source, tmp: Path, wtype: str, say: Progress) -> dict:
    from edge.formats import edge_weights
    from edge.formats.hf import load_weights

    say("reading checkpoint")
    weights = load_weights(src.path)
    say(f"writing weights ({wtype})")
    edge_weights.save(weights, tmp / "weights.safetensors", wtype)
    tok_roles = copy_tokenizer(hf_tokenizer_file(src.path), tmp)
    bos, eos = hf_special_ids(src.path)
    infos = read_header(tmp / "weights.safetensors")
    expert = sum(i.nbytes for n, i in infos.items() if n.endswith((".gate", ".up", ".down")))
    dense = sum(i.nbytes for i in infos.values()) - expert
    spec = replace(weights.spec, expert_bytes=expert, dense_bytes=dense, weight_dtype=wtype.upper(), source_format="edge")
    return {
        "name": src.name, "format": "edge", "weight_type": wtype, "source": str(src.path.resolve()),
        "spec": spec, "tokenizer": TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=eos, bos_id=bos),
        "roles": {"weights.safetensors": "weights"} | tok_roles,
    }
