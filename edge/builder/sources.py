"""A model's tensors one at a time, for builders that must stay within bounded memory whatever the
model's size: the trunk's tensors under GGUF names with the type they are stored at in an offload
bundle, and each routed expert's three matrices as float32.

* :class:`HFSource` — a Hugging Face checkpoint (single or sharded safetensors, F32/F16/BF16):
  matrices become Q8_0 (what the offload engine runs them at), vectors and routers stay F32.
* :class:`GGUFSource` — a GGUF: trunk tensors keep their bytes and types (nothing re-quantized),
  experts are dequantized expert by expert with the ``gguf`` package.

Memory: one tensor (the largest is usually the embedding) or one expert at a time.
Shapes in numpy order: D hidden, F expert FFN, E experts, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ModelFormatError
from edge.formats import hf
from edge.formats import safetensors_io as st
from edge.formats.gguf_stream import GGUF_ARCH, TensorPlan
from edge.formats.gguf_write import permute_qk
from edge.runtime import ggml
from edge.spec import ModelSpec

Q8_0, F32 = ggml.Q8_0, ggml.F32


@dataclass(frozen=True)
class Trunk:
    """What an offload bundle's dense.gguf receives from a source."""

    tensors: list[TensorPlan]
    copy_metadata: object | None  # a GGUF reader whose metadata (tokenizer included) is copied


def _q8_or_f32(name: str, shape: tuple[int, ...]) -> int:
    """The bundle's type for a trunk tensor from float weights: vectors and routers exact, matrices
    Q8_0 (whose rows must be whole 32-weight blocks: else F32)."""
    if len(shape) == 1 or "ffn_gate_inp" in name or shape[-1] % 32:
        return F32
    return Q8_0


def _bytes(a: np.ndarray, gtype: int) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if gtype == F32:
        return a
    return ggml.Weight.quantized(a.reshape(-1, a.shape[-1]), gtype).data


class HFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = hf.read_config(self.path)
        self.infos = hf.tensor_index(self.path)
        self.spec: ModelSpec = hf.spec_from_config(self.config, self.infos)
        self._get = hf.CheckpointTensors(self.path, self.infos)

    @property
    def source_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def largest_tensor_bytes(self) -> int:
        """The largest tensor as float32 (what reading it one at a time holds at once)."""
        return max(int(np.prod(i.shape, dtype=np.int64)) * 4 for i in self.infos.values())

    def close(self) -> None:
        """Nothing stays open between reads (each tensor's file is opened to read it)."""

    def _moe_prefix(self, i: int) -> str:
        moe = f"model.layers.{i}.block_sparse_moe"
        return moe if self.spec.arch == "mixtral" and f"{moe}.gate.weight" in self.infos else f"model.layers.{i}.mlp"

    def trunk(self) -> Trunk:
        s = self.spec
        D, V, Dh = s.hidden_size, s.vocab_size, s.head_dim
        q, kv, S = s.n_heads * Dh, s.n_kv_heads * Dh, s.shared_expert_ffn_size
        plans: list[TensorPlan] = []

        def put(gname: str, hname: str, shape: tuple[int, ...], fix=None) -> None:
            gtype = _q8_or_f32(gname, shape)

            def produce() -> np.ndarray:
                a = self._get(hname, shape)
                return _bytes(a if fix is None else fix(a), gtype)

            plans.append(TensorPlan(gname, shape, gtype, produce))

        put("token_embd.weight", "model.embed_tokens.weight", (V, D))
        put("output_norm.weight", "model.norm.weight", (D,))
        if not s.tied_embeddings and "lm_head.weight" in self.infos:
            put("output.weight", "lm_head.weight", (V, D))
        interleave = s.arch == "mixtral"  # llama.cpp's "llama" arch interleaves RoPE pairs in Q and K
        for i in range(s.n_layers):
            a, b, m = f"model.layers.{i}.self_attn", f"blk.{i}", self._moe_prefix(i)
            put(f"{b}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (D,))
            put(f"{b}.attn_q.weight", f"{a}.q_proj.weight", (q, D), (lambda w: permute_qk(w, s.n_heads)) if interleave else None)
            put(f"{b}.attn_k.weight", f"{a}.k_proj.weight", (kv, D), (lambda w: permute_qk(w, s.n_kv_heads)) if interleave else None)
            put(f"{b}.attn_v.weight", f"{a}.v_proj.weight", (kv, D))
            put(f"{b}.attn_output.weight", f"{a}.o_proj.weight", (D, q))
            if s.attn_bias:
                for x, n in (("q", q), ("k", kv), ("v", kv)):
                    put(f"{b}.attn_{x}.bias", f"{a}.{x}_proj.bias", (n,))
            if s.qk_norm:
                put(f"{b}.attn_q_norm.weight", f"{a}.q_norm.weight", (Dh,))
                put(f"{b}.attn_k_norm.weight", f"{a}.k_norm.weight", (Dh,))
            put(f"{b}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", (D,))
            put(f"{b}.ffn_gate_inp.weight", f"{m}.gate.weight", (s.n_experts, D))
            if S:
                put(f"{b}.ffn_gate_shexp.weight", f"{m}.shared_expert.gate_proj.weight", (S, D))
                put(f"{b}.ffn_up_shexp.weight", f"{m}.shared_expert.up_proj.weight", (S, D))
                put(f"{b}.ffn_down_shexp.weight", f"{m}.shared_expert.down_proj.weight", (D, S))
                put(f"{b}.ffn_gate_inp_shexp.weight", f"{m}.shared_expert_gate.weight", (D,), lambda w: w.reshape(-1))
        return Trunk(plans, None)

    def _expert_loader(self, i: int):
        s = self.spec
        E, F, D = s.n_experts, s.expert_ffn_size, s.hidden_size
        m = self._moe_prefix(i)
        fused = f"{m}.experts.gate_up_proj"
        if fused in self.infos:  # transformers 5: [E, 2F, D] and [E, D, F], one expert sliced at a time
            gu, dn = self.infos[fused], self.infos[f"{m}.experts.down_proj"]
            for info, shape in ((gu, (E, 2 * F, D)), (dn, (E, D, F))):
                if tuple(info.shape) != shape:
                    raise ModelFormatError(f"{self.path}: tensor {info} has shape {list(info.shape)}, config implies {list(shape)}")

            def fused_expert(e: int) -> list[np.ndarray]:
                g_u = st.load_rows(gu, e, 1)[0]
                return [g_u[:F], g_u[F:], st.load_rows(dn, e, 1)[0]]

            return fused_expert
        names = ("w1", "w3", "w2") if s.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        shapes = ((F, D), (F, D), (D, F))
        return lambda e: [self._get(f"{m}.experts.{e}.{n}.weight", sh) for n, sh in zip(names, shapes)]

    def dense(self, name: str, layer: int | None = None) -> np.ndarray | None:
        """One trunk tensor as float32 in the canonical layout (edge/formats/weights.py names:
        embed, norm, lm_head, or a LayerWeights field of ``layer``); None where the model has none."""
        s = self.spec
        D, V, Dh, S = s.hidden_size, s.vocab_size, s.head_dim, s.shared_expert_ffn_size
        q, kv = s.n_heads * Dh, s.n_kv_heads * Dh
        if layer is None:
            if name == "lm_head" and not s.tied_embeddings and "lm_head.weight" in self.infos:
                return self._get("lm_head.weight", (V, D))
            hname = {"embed": "model.embed_tokens.weight", "lm_head": "model.embed_tokens.weight",
                     "norm": "model.norm.weight"}[name]
            return self._get(hname, (V, D) if name != "norm" else (D,))
        a, m, p = f"model.layers.{layer}.self_attn", self._moe_prefix(layer), f"model.layers.{layer}"
        table = {"attn_norm": (f"{p}.input_layernorm.weight", (D,)), "wq": (f"{a}.q_proj.weight", (q, D)),
                 "wk": (f"{a}.k_proj.weight", (kv, D)), "wv": (f"{a}.v_proj.weight", (kv, D)),
                 "wo": (f"{a}.o_proj.weight", (D, q)), "bq": (f"{a}.q_proj.bias", (q,)),
                 "bk": (f"{a}.k_proj.bias", (kv,)), "bv": (f"{a}.v_proj.bias", (kv,)),
                 "q_norm": (f"{a}.q_norm.weight", (Dh,)), "k_norm": (f"{a}.k_norm.weight", (Dh,)),
                 "ffn_norm": (f"{p}.post_attention_layernorm.weight", (D,)),
                 "router": (f"{m}.gate.weight", (s.n_experts, D)),
                 "shared_gate": (f"{m}.shared_expert.gate_proj.weight", (S, D)),
                 "shared_up": (f"{m}.shared_expert.up_proj.weight", (S, D)),
                 "shared_down": (f"{m}.shared_expert.down_proj.weight", (D, S)),
                 "shared_router": (f"{m}.shared_expert_gate.weight", (1, D))}
        hname, shape = table[name]
        return self._get(hname, shape) if hname in self.infos else None

    def expert(self, layer: int, e: int) -> list[np.ndarray]:
        """[gate F x D, up F x D, down D x F] float32 of one routed expert."""
        return self._expert_loader(layer)(e)

    def experts(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(layer, expert, [gate F x D, up F x D, down D x F]) float32, in store order."""
        for i in range(self.spec.n_layers):
            load = self._expert_loader(i)
            for e in range(self.spec.n_experts):
                yield i, e, load(e)


class GGUFSource:
    """Reads go through ``os.pread`` and the pages are dropped after each tensor or expert: a
    memory map of the source would keep every page it touched in the process's RSS (a 4.2 GB
    source built at 5.2 GB RSS that way)."""

    def __init__(self, path: Path):
        from edge.formats.gguf_read import open_reader, read_spec

        self.path = Path(path)
        self.reader = open_reader(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.spec: ModelSpec = read_spec(self.path, self.reader)
        self.tensors = {t.name: t for t in self.reader.tensors}
        from edge.runtime.offload.experts import expert_tensors

        self.layers = expert_tensors(self.path, self.reader, self.spec)  # checked: shapes, types edge computes
        self._trunk = self._trunk_plans()

    @property
    def source_bytes(self) -> int:
        return sum(t.n_bytes for t in self.reader.tensors)

    def largest_tensor_bytes(self) -> int:
        """The largest trunk tensor as stored, or one expert's matrices as float32, whichever is more."""
        trunk = max(t.n_bytes for t in self.reader.tensors if "_exps." not in t.name)
        return max(trunk, 3 * self.spec.hidden_size * self.spec.expert_ffn_size * 4)

    def trunk(self) -> Trunk:
        return Trunk(self._trunk, self.reader)

    def _trunk_plans(self) -> list[TensorPlan]:
        plans = []
        for t in self.reader.tensors:
            if "_exps." in t.name:
                continue
            if t.tensor_type.name not in ggml.COMPUTABLE:
                from edge.errors import UnsupportedModelError

                raise UnsupportedModelError(f"{self.path.name}: tensor {t.name} is {t.tensor_type.name}, which edge does "
                                            f"not compute (supported: {', '.join(ggml.COMPUTABLE)})")
            plans.append(TensorPlan(t.name, tuple(reversed(t.shape)), int(t.tensor_type),
                                    lambda t=t: self._read(t.data_offset, t.n_bytes)))
        return plans

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self, offset: int, n: int) -> np.ndarray:
        """``n`` bytes at ``offset``, read (not mapped), their page-cache pages given back."""
        out = np.empty(n, np.uint8)
        view, done = memoryview(out), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise ModelFormatError(f"{self.path.name}: short read at {offset + done:,}")
            done += got
        os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_DONTNEED)
        return out

    _GGUF_NAMES = {"embed": "token_embd", "norm": "output_norm", "lm_head": "output", "attn_norm": "attn_norm",
                   "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "bq": "attn_q.bias",
                   "bk": "attn_k.bias", "bv": "attn_v.bias", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
                   "ffn_norm": "ffn_norm", "router": "ffn_gate_inp", "shared_gate": "ffn_gate_shexp",
                   "shared_up": "ffn_up_shexp", "shared_down": "ffn_down_shexp", "shared_router": "ffn_gate_inp_shexp"}

    def dense(self, name: str, layer: int | None = None) -> np.ndarray | None:
        """One trunk tensor dequantized to float32 in the canonical layout (HFSource.dense's names)."""
        from gguf.quants import dequantize

        from edge.formats.gguf_write import unpermute_qk

        base = self._GGUF_NAMES[name]
        full = base if "." in base else base + ".weight"
        t = self.tensors.get(full if layer is None else f"blk.{layer}.{full}")
        if t is None and name == "lm_head":
            t = self.tensors["token_embd.weight"]  # tied
        if t is None:
            return None
        a = np.asarray(dequantize(self._read(t.data_offset, t.n_bytes), t.tensor_type), np.float32)
        a = a.reshape(tuple(int(x) for x in reversed(t.shape)))
        if self.spec.arch == "mixtral" and name in ("wq", "wk"):  # llama.cpp's "llama" arch interleaves RoPE pairs
            a = unpermute_qk(a, self.spec.n_heads if name == "wq" else self.spec.n_kv_heads)
        return a.reshape(1, -1) if name == "shared_router" else a

    def expert(self, layer: int, e: int) -> list[np.ndarray]:
        """[gate F x D, up F x D, down D x F] float32 of one routed expert."""
        from gguf.quants import dequantize

        mats = []
        for t in self.layers[layer]:
            raw = self._read(t.offset + e * t.expert_bytes, t.expert_bytes)
            mats.append(np.asarray(dequantize(raw, t.gtype), np.float32).reshape(t.rows, t.cols))
        return mats

    def experts(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        for i in range(self.spec.n_layers):
            for e in range(self.spec.n_experts):
                yield i, e, self.expert(i, e)


def open_source(path: Path, kind: str):
    return GGUFSource(path) if kind == "gguf" else HFSource(path)


def gguf_arch(spec: ModelSpec) -> str:
    return GGUF_ARCH[spec.arch]
