"""Read GGUF files: where every tensor's bytes are (without reading them), a ModelSpec from the
metadata, and float32 weights by dequantizing.

gguf-py parses the header; edge's reader stops before gguf-py builds a view of each tensor's data
(which, on a file cut short, fails with numpy's words instead of the tensor's name): tensors are
:class:`TensorInfo` records of where their bytes are, checked against the file's size, and read
only when a caller asks (``reader.data`` is the file, memory-mapped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelFormatError, UnsupportedModelError
from edge.formats.gguf_write import GGUF_ARCH, unpermute_qk
from edge.formats.weights import LayerWeights, ModelWeights
from edge.memory import DIRECT_IO_ALIGN
from edge.spec import ModelSpec, StoredExperts

_ARCH_FROM_GGUF = {v: k for k, v in GGUF_ARCH.items()}
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its ggml type, shape in ggml order (ne0 = the contiguous dim),
    and where its bytes are in the file (``data_offset``, ``n_bytes``)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int

    def bytes_of(self, reader) -> np.ndarray:
        """The tensor's raw bytes (a view of the memory-mapped file)."""
        return reader.data[self.data_offset : self.data_offset + self.n_bytes]

    @property
    def data(self):  # not stored: read through bytes_of(reader)
        raise AttributeError("TensorInfo holds no data; use bytes_of(reader)")


# GGUF metadata value types (ggml's gguf.h): sizes of the fixed-size ones; 8 = string, 9 = array
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_metadata(path: Path) -> None:
    """Walk a GGUF file's metadata before gguf-py parses it, checking every length and count
    against the bytes left in the file: gguf-py builds Python objects per array item, so a
    damaged length that sends it into the tensor data made it parse millions of garbage items
    (a flipped byte in one string's length: 42 s and over 2 GiB before it failed; found by the
    fuzz test). Nested arrays, which ggml's own reader refuses, are refused too. A ValueError
    naming the field and the numbers."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size = len(m)

        def u(pos: int, n: int) -> int:
            if pos + n > size:
                raise ValueError(f"its header ends early at byte {pos:,}")
            return int.from_bytes(m[pos:pos + n], "little")

        def string(pos: int, what: str) -> int:  # the position after a string
            n = u(pos, 8)
            if n > size - pos - 8:
                raise ValueError(f"{what} claims {n:,} bytes at byte {pos:,}; the file has {size - pos - 8:,} left")
            return pos + 8 + n

        n_tensors, n_kv = u(8, 8), u(16, 8)
        if n_tensors * 24 > size or n_kv * 13 > size:  # the smallest tensor info / key-value pair
            raise ValueError(f"it claims {n_tensors:,} tensors and {n_kv:,} metadata keys in {size:,} bytes")
        pos = 24
        for _ in range(n_kv):
            key_end = string(pos, "a metadata key")
            key = m[pos + 8:key_end].decode("utf-8", "replace")
            if not (key.isascii() and key.isprintable() and len(key) <= 1024):
                raise ValueError(f"the metadata key at byte {pos:,} is not a key ({key_end - pos - 8:,} bytes)")
            vtype, pos = u(key_end, 4), key_end + 4
            if vtype == _ARRAY:
                itype, count, pos = u(pos, 4), u(pos + 4, 8), pos + 12
                if itype == _ARRAY:
                    raise ValueError(f"metadata {key} is an array of arrays")
                least = 8 if itype == _STRING else _GGUF_SCALAR.get(itype)
                if least is None:
                    raise ValueError(f"metadata {key} has items of unknown type {itype}")
                if count * least > size - pos:
                    raise ValueError(f"metadata {key} claims {count:,} items; the file has {size - pos:,} bytes left")
                if itype == _STRING:
                    for _ in range(count):
                        pos = string(pos, f"an item of metadata {key}")
                else:
                    pos += count * least
            elif vtype == _STRING:
                pos = string(pos, f"metadata {key}")
            elif vtype in _GGUF_SCALAR:
                pos += _GGUF_SCALAR[vtype]
            else:
                raise ValueError(f"metadata {key} has unknown type {vtype}")


def _header_reader():
    import gguf

    class HeaderReader(gguf.GGUFReader):
        """gguf-py's parser of the header and tensor infos, without its per-tensor data views."""

        def _build_tensors(self, start_offs: int, fields) -> None:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            seen: set[str] = set()
            tensors = []
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                name = str(bytes(name_data), encoding="utf-8")
                if name in seen:
                    raise ValueError(f"tensor {name} appears twice")
                seen.add(name)
                try:
                    gtype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ValueError(f"tensor {name} has unknown ggml type id {int(raw_dtype[0])}") from None
                shape = tuple(int(d) for d in dims.tolist())
                if any(d < 0 for d in shape):
                    raise ValueError(f"tensor {name} has a negative dimension {list(shape)}")
                n = int(np.prod(shape, dtype=object))
                block, size = GGML_QUANT_SIZES[gtype]
                if shape and shape[0] % block:
                    raise ValueError(f"tensor {name}: rows of {shape[0]} are not whole {gtype.name} blocks of {block}")
                tensors.append(TensorInfo(name, gtype, shape, n, n * size // block, int(start_offs + int(offset_tensor[0]))))
            self.tensors = tensors

    return HeaderReader


def open_reader(path: Path):
    """The header of a GGUF file (gguf-py's parser) with its tensors as :class:`TensorInfo`;
    a non-GGUF, damaged or cut-short file is a one-line ModelFormatError naming the problem."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ModelFormatError(f"{path.name} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        check_metadata(path)
        reader = _header_reader()(str(path))
    except Exception as e:  # gguf-py raises bare ValueError/IndexError/OverflowError on damaged headers
        raise ModelFormatError(f"{path.name} is a damaged GGUF file ({size:,} bytes): {_why(e)}") from None
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ModelFormatError(
                f"{path.name} is cut short: tensor {t.name} ({t.tensor_type.name} {list(t.shape)}) needs bytes "
                f"{t.data_offset:,}..{end:,}, the file ends at {size:,} ({end - size:,} bytes missing)")
    return reader


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, IndexError) or "out of bounds" in text or "cannot reshape" in text:
        return "its header ends early or holds an impossible count"
    return text[:200]


def _fields(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # metadata we do not understand is not needed
            continue
    return out


def _f32(v: Any) -> float:
    """GGUF stores floats as float32: print the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _is_expert(name: str) -> bool:
    return "_exps." in name


def read_spec(path: Path, reader=None) -> ModelSpec:
    reader = reader or open_reader(path)
    kv = _fields(reader)
    garch = kv.get("general.architecture")
    n_experts = int(kv.get(f"{garch}.expert_count", 0) or 0)
    if garch not in _ARCH_FROM_GGUF or not n_experts:
        if not n_experts:
            raise UnsupportedModelError(
                f"{path.name} is a dense '{garch}' model (no experts); edge runs Mixture-of-Experts models")
        raise UnsupportedModelError(f"{path.name}: GGUF architecture '{garch}' is not supported")
    arch = _ARCH_FROM_GGUF[garch]
    tensors = {t.name: t for t in reader.tensors}

    def key(k: str, default: Any = None) -> Any:
        v = kv.get(f"{garch}.{k}", default)
        if v is None:
            raise ModelFormatError(f"{path.name} lacks metadata key {garch}.{k}")
        return v

    d, h = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(kv.get(f"{garch}.attention.key_length") or kv.get(f"{garch}.rope.dimension_count") or d // h)
    ffn = int(key("feed_forward_length") if arch == "mixtral" else key("expert_feed_forward_length"))
    shared = int(kv.get(f"{garch}.expert_shared_feed_forward_length") or 0) if "blk.0.ffn_gate_shexp.weight" in tensors else 0
    sizes = {True: [0, 0], False: [0, 0]}
    for t in reader.tensors:
        sizes[_is_expert(t.name)][0] += int(t.n_elements)
        sizes[_is_expert(t.name)][1] += int(t.n_bytes)
    expert_types = sorted({t.tensor_type.name for t in reader.tensors if _is_expert(t.name)})
    vocab = tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in tensors else key("vocab_size")
    return ModelSpec(
        arch=arch,
        n_layers=int(key("block_count")),
        hidden_size=d,
        n_heads=h,
        n_kv_heads=int(kv.get(f"{garch}.attention.head_count_kv") or h),
        head_dim=head_dim,
        n_experts=n_experts,
        top_k=int(key("expert_used_count")),
        expert_ffn_size=ffn,
        n_shared_experts=1 if shared else 0,
        shared_expert_ffn_size=shared,
        vocab_size=int(vocab),
        context_length=int(key("context_length")),
        rope_theta=_f32(kv.get(f"{garch}.rope.freq_base") or 10000.0),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        norm_topk_prob=arch != "qwen2_moe",
        attn_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tied_embeddings="output.weight" not in tensors,
        dense_params=sizes[False][0],
        expert_params=sizes[True][0],
        dense_bytes=sizes[False][1],
        expert_bytes=sizes[True][1],
        weight_dtype="/".join(expert_types),
        source_format="gguf",
    )


@dataclass(frozen=True)
class ExpertTensor:
    """One ``ffn_*_exps`` tensor of one layer: E experts of [rows, cols] in a ggml type."""

    name: str
    gtype: int
    rows: int
    cols: int
    offset: int  # file offset of expert 0
    expert_bytes: int

    def span(self, expert: int) -> tuple[int, int, int]:
        """(aligned start, aligned length, where the expert's bytes begin inside) of its read."""
        off = self.offset + expert * self.expert_bytes
        start = off // DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
        end = -(-(off + self.expert_bytes) // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
        return start, end - start, off - start

    @property
    def max_span(self) -> int:
        return -(-(self.expert_bytes + DIRECT_IO_ALIGN - 1) // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN


def stored_experts(reader, spec: ModelSpec) -> StoredExperts:
    """What the planner needs of a MoE GGUF read straight from the file (edge.spec.StoredExperts):
    each expert's three slices, the aligned spans the engine reads (:meth:`ExpertTensor.span`) and
    its slots hold, and the trunk by type (the embedding table is resident but a token reads one
    row of it)."""
    tensors = {t.name: t for t in reader.tensors}
    slots, reads, types = [], [], []
    E = spec.n_experts
    for i in range(spec.n_layers):
        trio = [tensors[f"blk.{i}.{m}.weight"] for m in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
        mats = [ExpertTensor(t.name, int(t.tensor_type), int(t.shape[1]), int(t.shape[0]), t.data_offset, t.n_bytes // E)
                for t in trio]
        slots.append(sum(m.max_span for m in mats))
        reads.append(int(sum(m.span(e)[1] for m in mats for e in range(E)) / E))
        types.append(tuple((t.tensor_type.name, m.expert_bytes) for t, m in zip(trio, mats)))
    trunk = [t for t in reader.tensors if not _is_expert(t.name)]
    streamed: dict[str, int] = {}
    for t in trunk:
        if t.name == "token_embd.weight" and not spec.tied_embeddings:
            continue  # a token reads one row of the table
        streamed[t.tensor_type.name] = streamed.get(t.tensor_type.name, 0) + t.n_bytes
    return StoredExperts(tuple(slots), tuple(reads), 3, tuple(types), sum(t.n_bytes for t in trunk),
                         tuple(sorted(streamed.items())))


def load_weights(path: Path) -> ModelWeights:
    """All weights dequantized to float32, in the engine's canonical layout."""
    from gguf.quants import dequantize

    reader = open_reader(path)
    s = read_spec(path, reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path.name} lacks tensor {name}")
        return np.asarray(dequantize(t.bytes_of(reader), t.tensor_type), dtype=np.float32).reshape(
            tuple(int(x) for x in reversed(t.shape)))

    def opt(name: str) -> np.ndarray | None:
        return get(name) if name in tensors else None

    embed = get("token_embd.weight")
    layers = []
    for i in range(s.n_layers):
        b = f"blk.{i}"
        wq, wk = get(f"{b}.attn_q.weight"), get(f"{b}.attn_k.weight")
        if s.arch == "mixtral":
            wq, wk = unpermute_qk(wq, s.n_heads), unpermute_qk(wk, s.n_kv_heads)
        sr = opt(f"{b}.ffn_gate_inp_shexp.weight")
        layers.append(LayerWeights(
            attn_norm=get(f"{b}.attn_norm.weight"), wq=wq, wk=wk, wv=get(f"{b}.attn_v.weight"),
            wo=get(f"{b}.attn_output.weight"), ffn_norm=get(f"{b}.ffn_norm.weight"),
            router=get(f"{b}.ffn_gate_inp.weight"), gate=get(f"{b}.ffn_gate_exps.weight"),
            up=get(f"{b}.ffn_up_exps.weight"), down=get(f"{b}.ffn_down_exps.weight"),
            bq=opt(f"{b}.attn_q.bias"), bk=opt(f"{b}.attn_k.bias"), bv=opt(f"{b}.attn_v.bias"),
            q_norm=opt(f"{b}.attn_q_norm.weight"), k_norm=opt(f"{b}.attn_k_norm.weight"),
            shared_gate=opt(f"{b}.ffn_gate_shexp.weight"), shared_up=opt(f"{b}.ffn_up_shexp.weight"),
            shared_down=opt(f"{b}.ffn_down_shexp.weight"),
            shared_router=None if sr is None else sr.reshape(1, -1),
        ))
    lm_head = embed if s.tied_embeddings else get("output.weight")
    return ModelWeights(spec=s, embed=embed, norm=get("output_norm.weight"), lm_head=lm_head, layers=layers)
