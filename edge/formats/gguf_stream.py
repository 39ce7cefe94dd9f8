"""Writing GGUF files one tensor at a time: the header (metadata, tokenizer, every tensor's name,
shape and type) first, then each tensor's bytes as its producer makes them, so a file of any size
is written in the memory of its largest tensor (gguf-py's writer, used in its streaming mode).

Model metadata follows llama.cpp's conventions for the architecture (what llama.cpp needs to load
the file); tensors may be any ggml type, handed over as raw bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.formats.gguf_vocab import add_vocab, vocab_fields
from edge.formats.hf import chat_template_parts
from edge.spec import ModelSpec

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name, shape in numpy order ([..., rows, cols]), ggml type id, and
    a producer returning its bytes (a uint8 array, or a float array of that type's dtype)."""

    name: str
    shape: tuple[int, ...]
    gtype: int
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.gtype, self.shape)


def tensor_bytes(gtype: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (numpy order, last axis contiguous) in ggml type ``gtype``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} are not whole blocks of {block}")
    return n // block * size


def add_model_metadata(w, s: ModelSpec, tokenizer_json: Path | None, *, name: str, file_type: int,
                       bos_id: int | None, eos_id: int | None) -> None:
    """The metadata llama.cpp reads for ``s.arch`` and (unless ``tokenizer_json`` is None) the
    tokenizer, on a gguf.GGUFWriter."""
    w.add_name(name)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.n_layers)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_expert_count(s.n_experts)
    w.add_expert_used_count(s.top_k)
    w.add_vocab_size(s.vocab_size)
    w.add_file_type(file_type)
    if s.arch == "mixtral":
        w.add_feed_forward_length(s.expert_ffn_size)
        w.add_rope_dimension_count(s.head_dim)
    else:
        w.add_expert_feed_forward_length(s.expert_ffn_size)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        if s.shared_expert_ffn_size:
            w.add_expert_shared_feed_forward_length(s.shared_expert_ffn_size)
    if tokenizer_json is None:
        return
    add_vocab(w, vocab_fields(tokenizer_json, s.vocab_size), bos_id=bos_id, eos_id=eos_id)
    template, _, _ = chat_template_parts(Path(tokenizer_json).parent)
    if template is not None:  # the tokenizer folder's chat template, where llama.cpp and edge look for it
        w.add_chat_template(template)


def copy_metadata(w, reader) -> None:
    """Every key of another GGUF's metadata (architecture, tokenizer, ...) onto a writer."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not field.types:
            continue  # the writer writes the header counts and the architecture itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)


def write_streaming(out: Path, arch: str, metadata: Callable[[object], None], tensors: Iterable[TensorPlan],
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``out``: header and tensor table, then each tensor's bytes as produced (in order).
    ``progress(bytes_done, bytes_total)`` after each tensor. The file is whole when this returns;
    an exception leaves a partial file for the caller to delete."""
    import gguf

    plans = list(tensors)
    w = gguf.GGUFWriter(str(out), arch)
    metadata(w)
    for t in plans:  # element shape + raw type: gguf-py derives ne from it
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_bytes(t.gtype, t.shape),
                          raw_dtype=gguf.GGMLQuantizationType(t.gtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total, done = sum(tensor_bytes(t.gtype, t.shape) for t in plans), 0
    for t in plans:
        data = np.ascontiguousarray(t.produce())
        want = tensor_bytes(t.gtype, t.shape)
        if data.nbytes != want:
            raise ValueError(f"tensor {t.name}: produced {data.nbytes:,} bytes, its type and shape need {want:,}")
        w.write_tensor_data(data.reshape(-1).view(np.uint8))
        done += want
        if progress:
            progress(done, total)
    w.close()
    with open(out, "rb") as f:
        os.fsync(f.fileno())
