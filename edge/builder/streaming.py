"""Offload bundles built by streaming, in bounded memory whatever the model's size.

From a Hugging Face checkpoint or a GGUF, one tensor or one expert at a time:

1. ``dense.gguf`` — the trunk at the precision the engine runs it (from float weights: Q8_0
   matrices, F32 vectors and routers; from a GGUF: its own tensors, bytes and types untouched,
   with its metadata and tokenizer);
2. ``experts.bin`` — every expert's nested record (``max_bits`` planes), written as encoded;
3. locality — calibration text routed through the offload engine running this very bundle with
   one cache slot per layer (edge/builder/calibrate.py), then the same replays as always.

Peak memory: the largest single tensor (as float32 when it is converted) plus the calibration
engine (the trunk, one expert slot per layer, a 512-token context) plus Python and the libraries.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge.builder import calibrate
from edge.builder.offload import locality_from
from edge.builder.sources import GGUFSource, HFSource
from edge.formats.bundle import Progress, TokenizerInfo, copy_tokenizer
from edge.formats.gguf_stream import GGUF_ARCH, add_model_metadata, copy_metadata, write_streaming
from edge.quant.nested import NestedLayout, encode
from edge.quant.store import write_store


def populate(source: HFSource | GGUFSource, tmp: Path, say: Progress, *, name: str, origin: str, max_bits: int,
             eos: tuple[int, ...], bos: int | None, tokenizer_json: Path | None,
             calibration: Path | None = None) -> dict:
    """Write the bundle's files into ``tmp`` and return its manifest fields."""
    import gguf

    s = source.spec
    F, D = s.expert_ffn_size, s.hidden_size
    layout = NestedLayout(((F, D), (F, D), (D, F)), max_bits=max_bits)
    trunk = source.trunk()
    total = sum(t.nbytes for t in trunk.tensors)
    t0 = time.perf_counter()

    def meta(w) -> None:
        if trunk.copy_metadata is not None:
            copy_metadata(w, trunk.copy_metadata)
        else:
            add_model_metadata(w, s, None, name=name, file_type=gguf.LlamaFileType.MOSTLY_Q8_0, bos_id=bos, eos_id=eos[0] if eos else None)

    write_streaming(tmp / "dense.gguf", _arch(source), meta, trunk.tensors,
                    progress=lambda done, tot: say("dense weights", done, tot))
    n = s.n_layers * s.n_experts
    per = source.source_bytes / max(1, n)  # of the source's bytes, about one expert's share each

    def records():
        for k, (i, e, mats) in enumerate(source.experts()):
            yield encode(mats, max_bits=max_bits)
            say(f"experts (layer {i + 1}/{s.n_layers})", int((k + 1) * per), int(n * per))

    index = write_store(tmp / "experts.bin", layout, s.n_layers, s.n_experts, records())
    roles = {"dense.gguf": "weights", "experts.bin": "experts"}
    if tokenizer_json is not None:
        roles |= copy_tokenizer(tokenizer_json, tmp)
        tok_info = TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=eos, bos_id=bos)
    else:
        tok_info = TokenizerInfo(kind="gguf", file="dense.gguf", eos_ids=eos, bos_id=bos)
    say("measuring routing locality (the offload engine on calibration text)")
    locality = _calibrate(tmp, index, s, tok_info, calibration, say)
    spec = _spec_of(s, index, tmp / "dense.gguf")
    say(f"built in {time.perf_counter() - t0:.0f} s ({total:,} bytes of trunk)")
    return {"name": name, "format": "offload", "weight_type": f"nested-2..{max_bits}", "source": origin, "spec": spec,
            "tokenizer": tok_info, "experts": index.to_dict(), "locality": locality, "bitstack": None, "roles": roles}


def _arch(source) -> str:
    if isinstance(source, GGUFSource):
        return str(source.reader.fields["general.architecture"].contents())
    return GGUF_ARCH[source.spec.arch]


def _spec_of(s, index, dense: Path):
    from dataclasses import replace

    return replace(s, expert_bytes=index.file_bytes, dense_bytes=dense.stat().st_size,
                   weight_dtype=f"NESTED2-{index.layout.max_bits}", source_format="edge")


def _calibrate(tmp: Path, index, spec, tok_info: TokenizerInfo, text: Path | None, say: Progress) -> dict:
    """Route calibration text through the offload engine on the files just written."""
    from edge.hardware import default_threads
    from edge.runtime.offload import trunk as trunks
    from edge.runtime.offload.engine import OffloadConfig, OffloadEngine
    from edge.runtime.offload.experts import NestedExperts
    from edge.runtime.offload.store import ExpertStore

    encode_text = _encoder(tmp, tok_info)
    tokens = calibrate.calibration_tokens(encode_text, text)
    trunk = trunks.load_gguf_trunk(tmp / "dense.gguf", spec)
    bits = np.full((spec.n_layers, spec.n_experts), min(4, index.layout.max_bits), dtype=np.int64)
    config = OffloadConfig(slots=(1,) * spec.n_layers, bits=bits, prefetch=False, threads=default_threads())
    engine = OffloadEngine(trunk, NestedExperts(ExpertStore(tmp / "experts.bin", index), prefetch=False), config,
                           n_ctx=calibrate.WINDOW, batch=calibrate.batch_for(spec))
    try:
        trace, guesses = calibrate.engine_routing(
            engine, tokens, progress=lambda done, tot: say("calibration tokens", done, tot))
    finally:
        engine.close()
    say("replaying the expert cache on the calibration routing")
    return locality_from(trace, guesses) | {"calibration": str(text) if text else "stdlib training split"}


def _encoder(tmp: Path, tok_info: TokenizerInfo):
    if tok_info.kind == "hf":
        from edge.runtime.tokenizer import HFTokenizer

        return HFTokenizer(tmp / tok_info.file).encode
    from edge.runtime.llamacpp import load_model
    from edge.runtime.tokenizer import LlamaCppTokenizer

    return LlamaCppTokenizer(load_model(tmp / tok_info.file, vocab_only=True)).encode
