"""An ONNX graph of a MoE decoder for ONNX Runtime, built with onnx-ir from a source read one tensor
(or one expert) at a time.

The structure follows onnxruntime-genai's model builder (which exports none of edge's
architectures: Mixtral, Qwen2-MoE and Qwen3-MoE are not among its MoE families):

* token embedding: ``Gather`` (f32) or ``com.microsoft.GatherBlockQuantized`` over the int4/int8
  table; residual adds fused into ``SkipSimplifiedLayerNormalization``;
* attention: q, k and v from one fused projection, Qwen3's per-head q/k RMSNorm as separate ops,
  ``com.microsoft.GroupQueryAttention`` with rotary embedding from cos/sin tables and a KV cache
  fed back step by step (``past_key_values.N.key`` -> ``present.N.key``);
* dense matrices: ``MatMulNBits`` (block 32, ``accuracy_level=4``: int8 activations, ORT's fast
  path) at int4/int8, ``MatMul`` at f32;
* routed experts: ``com.microsoft.QMoE`` (block-wise int4/int8, gate/up rows interleaved for its
  fused SwiGLU) or ``MoE`` at f32, the router a float ``MatMul`` whose logits QMoE top-k selects
  and softmaxes over the k (Mixtral, Qwen3-MoE); where the model does not renormalise the top-k
  weights (Qwen2-MoE) the softmax over all experts is passed as the mixing weights;
* Qwen2-MoE's shared expert beside QMoE, gated by a sigmoid.

Inputs: ``input_ids`` int64 [1, T], ``seqlens_k`` int32 [1] (tokens after this step - 1),
``total_sequence_length`` int32 [] and ``logit_rows`` int64 [R] (which of the T positions get
logits: the last for decoding, all for scoring); outputs ``logits`` [1, R, V] and the presents.

Memory: tensors are produced while the file is written, one at a time (a layer's experts are
quantized expert by expert into that layer's packed tensors), never the whole model as float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.formats.onnx_quant import QMatrix, expert_block, interleave_rows, quantize
from edge.runtime.ort import kv_names
from edge.spec import ModelSpec

TYPES = ("int4", "int8", "f32")
# Bumped whenever the graph or its kernels' settings change: bundles edge keeps in its cache (the
# profiler's, `--backend ort`'s exports) are rebuilt when theirs differs.
GRAPH_VERSION = 2
BLOCK = 32
OPSET = 21
MAX_CONTEXT = 32768  # rotary tables are built for this many positions at most
# MatMulNBits' accuracy level by bits: 4 = int8 activations, ORT's fast path (what llama.cpp does for its
# quantized types too). At 8 bits the fp32-activation kernel (level 1) dequantizes: the default model's
# decode took 1.15 ms per token with the 8-bit output matrix at level 1, 0.50 ms at level 4.
ACCURACY = {4: 4, 8: 4}
# The token embedding and the output matrix stay at 8 bits in int4 bundles too (as llama.cpp's
# Q4_K_M keeps its output matrix at 6 bits): the default model's int4 bundle then agrees with the
# float model on 89.8% of 128 teacher-forced next tokens, against 87.5% with them at 4 bits.
HEAD_BITS = 8


def check_shape(spec: ModelSpec, wtype: str) -> str | None:
    """Why this model cannot be exported at ``wtype`` (None: it can)."""
    if wtype == "f32":
        return None
    dims = {"hidden size": spec.hidden_size, "expert FFN width": spec.expert_ffn_size,
            "attention width": spec.n_heads * spec.head_dim}
    if spec.shared_expert_ffn_size:
        dims["shared expert width"] = spec.shared_expert_ffn_size
    bad = [f"{k} {v}" for k, v in dims.items() if v % BLOCK]
    if bad:
        return f"{', '.join(bad)} not a multiple of the {BLOCK}-weight quantization block"
    return None


class _Experts:
    """One layer's routed experts in QMoE's packed form, quantized expert by expert the first time
    any of the layer's tensors is written, each handed out once and then dropped."""

    def __init__(self, source, layer: int, bits: int):
        self.source, self.layer, self.bits = source, layer, bits
        self.parts: dict[str, np.ndarray] | None = None

    def take(self, key: str) -> np.ndarray:
        if self.parts is None:
            self.parts = self._quantize()
        return self.parts.pop(key)

    def _quantize(self) -> dict[str, np.ndarray]:
        s = self.source.spec
        fc1: list[QMatrix] = []
        fc2: list[QMatrix] = []
        rowwise = self.bits == 8
        for e in range(s.n_experts):
            gate, up, down = self.source.expert(self.layer, e)
            fc1.append(quantize(interleave_rows(gate, up), self.bits, expert_block(self.bits, gate.shape[1], BLOCK)))
            fc2.append(quantize(down, self.bits, expert_block(self.bits, down.shape[1], BLOCK)))
        parts = {}
        for name, qs in (("fc1", fc1), ("fc2", fc2)):
            parts[f"{name}.w"] = np.stack([q.packed.reshape(q.packed.shape[0], -1) for q in qs])
            parts[f"{name}.s"] = np.stack([q.scales[:, 0] if rowwise else q.scales for q in qs])
            parts[f"{name}.z"] = np.stack([q.zeros[:, 0] if rowwise else q.zeros for q in qs])
        return parts


class _Builder:
    def __init__(self, source, wtype: str):
        import onnx_ir as ir
        from onnx_ir import tape

        self.ir, self.src, self.spec, self.wtype = ir, source, source.spec, wtype
        self.bits = {"int4": 4, "int8": 8}.get(wtype)
        self.t = tape.Tape()

    # -- initializers, produced lazily while the file is written ------------------------------
    def lazy(self, name: str, dtype, shape: tuple[int, ...], make: Callable[[], np.ndarray]):
        ir = self.ir

        def produce():
            a = make()
            assert a.shape == tuple(shape), (name, a.shape, shape)
            return ir.tensor(a, name=name)

        return self.t.initializer(ir.LazyTensor(produce, dtype, ir.Shape(shape), name=name), name=name)

    def const(self, name: str, a: np.ndarray):
        return self.t.initializer(self.ir.tensor(a, name=name), name=name)

    def _qparts(self, name: str, fetch: Callable[[], np.ndarray], bits: int, k: int, packed_shape: tuple[int, ...]):
        """The initializers (codes, scales, zero points) of matrix ``name`` [n, k] at ``bits``: quantized
        once, when the first of them is written, and dropped after the last."""
        ir, left, held = self.ir, {"b", "s", "z"}, {}

        def part(p: str) -> np.ndarray:
            if "q" not in held:
                held["q"] = quantize(fetch(), bits, BLOCK)
            q = held["q"]
            left.discard(p)
            if not left:
                held.clear()
            return {"b": q.packed.reshape(packed_shape), "s": q.scales, "z": q.zeros}[p]

        n, kb = packed_shape[0], k // BLOCK
        return (self.lazy(f"{name}.qweight", ir.DataType.UINT8, packed_shape, lambda: part("b")),
                self.lazy(f"{name}.scales", ir.DataType.FLOAT, (n, kb), lambda: part("s")),
                self.lazy(f"{name}.zeros", ir.DataType.UINT8, (n, (kb * bits + 7) // 8), lambda: part("z")))

    def matmul(self, x, name: str, n: int, k: int, fetch: Callable[[], np.ndarray], bits: int | None = None):
        """x [.., k] @ W.T where W [n, k] comes from ``fetch``: MatMulNBits or a float MatMul."""
        ir = self.ir
        if self.wtype == "f32":
            w = self.lazy(f"{name}.weight_t", ir.DataType.FLOAT, (k, n), lambda: np.ascontiguousarray(fetch().T))
            return self.t.op("MatMul", [x, w])
        bits = bits or self.bits
        b, s, z = self._qparts(name, fetch, bits, k, (n, k // BLOCK, BLOCK * bits // 8))
        attrs = dict(K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=ACCURACY[bits])
        return self.t.op("MatMulNBits", [x, b, s, z], attrs, domain="com.microsoft")

    # -- the network ----------------------------------------------------------------------------
    def build(self, max_context: int):
        ir, t, s = self.ir, self.t, self.spec
        D, G, Dh, V = s.hidden_size, s.n_kv_heads, s.head_dim, s.vocab_size
        f32, i64, i32 = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.INT32
        ids = ir.Value(name="input_ids", type=ir.TensorType(i64), shape=ir.Shape([1, "T"]))
        seqlens = ir.Value(name="seqlens_k", type=ir.TensorType(i32), shape=ir.Shape([1]))
        total = ir.Value(name="total_sequence_length", type=ir.TensorType(i32), shape=ir.Shape([]))
        rows = ir.Value(name="logit_rows", type=ir.TensorType(i64), shape=ir.Shape(["R"]))
        inputs, outputs = [ids, seqlens, total, rows], []
        x = self._embed(ids)
        cos, sin = self._rotary_tables(max_context)
        eps = float(s.rms_norm_eps)
        residual = None
        for i in range(s.n_layers):
            pk, pv, nk, nv = kv_names(i)
            past_k = ir.Value(name=pk, type=ir.TensorType(f32), shape=ir.Shape([1, G, "P", Dh]))
            past_v = ir.Value(name=pv, type=ir.TensorType(f32), shape=ir.Shape([1, G, "P", Dh]))
            inputs += [past_k, past_v]
            h, residual = self._norm(x, residual, f"layers.{i}.attn_norm", i, "attn_norm", eps)
            attn, present_k, present_v = self._attention(i, h, past_k, past_v, seqlens, total, cos, sin)
            present_k.name, present_v.name = nk, nv
            outputs += [present_k, present_v]
            h, residual = self._norm(attn, residual, f"layers.{i}.ffn_norm", i, "ffn_norm", eps)
            x = self._moe(i, h)
        h, _ = self._norm(x, residual, "norm", None, "norm", eps)
        h = t.op("Gather", [h, rows], dict(axis=1))
        logits = self.matmul(h, "lm_head", V, D, lambda: self.src.dense("lm_head"), bits=HEAD_BITS)
        logits.name = "logits"
        graph = ir.Graph(inputs, [logits, *outputs], nodes=t.nodes, initializers=t.initializers,
                         opset_imports={"": OPSET, "com.microsoft": 1}, name="edge-moe")
        return ir.Model(graph, ir_version=10, producer_name="edge")

    def _embed(self, ids):
        ir, s = self.ir, self.spec
        V, D = s.vocab_size, s.hidden_size
        if self.wtype == "f32":
            table = self.lazy("embed.weight", ir.DataType.FLOAT, (V, D), lambda: self.src.dense("embed"))
            return self.t.op("Gather", [table, ids], dict(axis=0))
        bits = HEAD_BITS
        # codes packed along the row, low bits first; zero points likewise
        data, scales, zeros = self._qparts("embed", lambda: self.src.dense("embed"), bits, D, (V, D * bits // 8))
        return self.t.op("GatherBlockQuantized", [data, ids, scales, zeros],
                         dict(bits=bits, block_size=BLOCK, gather_axis=0, quantize_axis=1), domain="com.microsoft")

    def _rotary_tables(self, max_context: int):
        s = self.spec
        half = np.arange(0, s.head_dim, 2, dtype=np.int64).astype(np.float32) / s.head_dim
        inv_freq = (1.0 / (np.float32(s.rope_theta) ** half)).astype(np.float32)
        freqs = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq[None, :]
        return self.const("rotary.cos", np.cos(freqs)), self.const("rotary.sin", np.sin(freqs))

    def _vector(self, name: str, layer: int | None, field: str, shape: tuple[int, ...]):
        return self.lazy(name, self.ir.DataType.FLOAT, shape, lambda: self.src.dense(field, layer).reshape(shape))

    def _norm(self, x, residual, name: str, layer: int | None, field: str, eps: float):
        """RMSNorm of x (+ residual, fused): (normed, the new residual stream)."""
        w = self._vector(f"{name}.weight", layer, field, (self.spec.hidden_size,))
        if residual is None:
            return self.t.op("SimplifiedLayerNormalization", [x, w], dict(epsilon=eps, axis=-1)), x
        outs = self.t.op_multi_out("SkipSimplifiedLayerNormalization", [x, residual, w], dict(epsilon=eps),
                                   num_outputs=4, domain="com.microsoft")
        return outs[0], outs[3]

    def _attention(self, i: int, h, past_k, past_v, seqlens, total, cos, sin):
        t, s, p = self.t, self.spec, f"layers.{i}"
        D, H, G, Dh = s.hidden_size, s.n_heads, s.n_kv_heads, s.head_dim
        q_dim, kv_dim = H * Dh, G * Dh

        def qkv() -> np.ndarray:
            return np.concatenate([self.src.dense(n, i) for n in ("wq", "wk", "wv")])

        x = self.matmul(h, f"{p}.qkv", q_dim + 2 * kv_dim, D, qkv)
        if s.attn_bias:
            bias = self.lazy(f"{p}.qkv.bias", self.ir.DataType.FLOAT, (q_dim + 2 * kv_dim,),
                             lambda: np.concatenate([self.src.dense(n, i) for n in ("bq", "bk", "bv")]))
            x = t.op("Add", [x, bias])
        if s.qk_norm:
            split = self.const(f"{p}.qkv.split", np.array([q_dim, kv_dim, kv_dim], np.int64))
            q, k, v = t.op_multi_out("Split", [x, split], dict(axis=-1), num_outputs=3)
            q = self._head_norm(q, H, f"{p}.q_norm", i, "q_norm")
            k = self._head_norm(k, G, f"{p}.k_norm", i, "k_norm")
            gqa_in = [q, k, v]
        else:
            gqa_in = [x, None, None]  # packed q|k|v
        attn, pk, pv = t.op_multi_out(
            "GroupQueryAttention", [*gqa_in, past_k, past_v, seqlens, total, cos, sin],
            dict(num_heads=H, kv_num_heads=G, do_rotary=1, rotary_interleaved=0), num_outputs=3, domain="com.microsoft")
        return self.matmul(attn, f"{p}.o_proj", D, q_dim, lambda: self.src.dense("wo", i)), pk, pv

    def _head_norm(self, x, heads: int, name: str, layer: int, field: str):
        t, Dh = self.t, self.spec.head_dim
        w = self._vector(f"{name}.weight", layer, field, (Dh,))
        shape = t.op("Shape", [x])
        per_head = t.op("Reshape", [x, self.const(f"{name}.heads", np.array([0, 0, heads, Dh], np.int64))])
        eps = float(self.spec.rms_norm_eps)
        normed = t.op("SimplifiedLayerNormalization", [per_head, w], dict(epsilon=eps, axis=-1))
        return t.op("Reshape", [normed, shape])

    def _moe(self, i: int, h):
        ir, t, s, p = self.ir, self.t, self.spec, f"layers.{i}"
        D, E, F = s.hidden_size, s.n_experts, s.expert_ffn_size
        router = self.lazy(f"{p}.router.weight_t", ir.DataType.FLOAT, (D, E),
                           lambda: np.ascontiguousarray(self.src.dense("router", i).T))
        flat = t.op("Reshape", [h, self.const(f"{p}.flat", np.array([-1, D], np.int64))])
        logits = t.op("MatMul", [flat, router])
        mixing = None if s.norm_topk_prob or self.wtype == "f32" else t.op("Softmax", [logits], dict(axis=-1))
        attrs = dict(k=s.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                     normalize_routing_weights=1 if s.norm_topk_prob else 0)
        if self.wtype == "f32":
            def fc(which: str) -> np.ndarray:
                out = np.empty((E, 2 * F, D) if which == "fc1" else (E, D, F), np.float32)
                for e in range(E):
                    gate, up, down = self.src.expert(i, e)
                    out[e] = interleave_rows(gate, up) if which == "fc1" else down
                return out

            w1 = self.lazy(f"{p}.experts.fc1", ir.DataType.FLOAT, (E, 2 * F, D), lambda: fc("fc1"))
            w2 = self.lazy(f"{p}.experts.fc2", ir.DataType.FLOAT, (E, D, F), lambda: fc("fc2"))
            y = t.op("MoE", [flat, logits, w1, None, w2], attrs, domain="com.microsoft")
        else:
            bits, experts = self.bits, _Experts(self.src, i, self.bits)
            u8 = ir.DataType.UINT8

            def tensor(key: str, dtype, shape):
                return self.lazy(f"{p}.experts.{key}", dtype, shape, lambda: experts.take(key))

            w1 = tensor("fc1.w", u8, (E, 2 * F, D * bits // 8))
            w2 = tensor("fc2.w", u8, (E, D, F * bits // 8))
            if bits == 8:  # row-wise: 8-bit experts keep fp32 activations only without blocks
                s1, z1 = tensor("fc1.s", ir.DataType.FLOAT, (E, 2 * F)), tensor("fc1.z", u8, (E, 2 * F))
                s2, z2 = tensor("fc2.s", ir.DataType.FLOAT, (E, D)), tensor("fc2.z", u8, (E, D))
                attrs |= dict(expert_weight_bits=8)
            else:
                s1 = tensor("fc1.s", ir.DataType.FLOAT, (E, 2 * F, D // BLOCK))
                z1 = tensor("fc1.z", u8, (E, 2 * F, (D // BLOCK * bits + 7) // 8))
                s2 = tensor("fc2.s", ir.DataType.FLOAT, (E, D, F // BLOCK))
                z2 = tensor("fc2.z", u8, (E, D, (F // BLOCK * bits + 7) // 8))
                attrs |= dict(expert_weight_bits=bits, block_size=BLOCK, accuracy_level=4)
            y = t.op("QMoE", [flat, logits, w1, s1, None, w2, s2, None, None, None, None, z1, z2, None, mixing],
                     attrs, domain="com.microsoft")
        if s.shared_expert_ffn_size:
            y = t.op("Add", [y, self._shared(i, flat)])
        return t.op("Reshape", [y, self.const(f"{p}.unflat", np.array([1, -1, D], np.int64))])

    def _shared(self, i: int, x):
        """Qwen2-MoE's always-on expert: SwiGLU, scaled by sigmoid(x . gate)."""
        t, s, p = self.t, self.spec, f"layers.{i}.shared"
        D, S = s.hidden_size, s.shared_expert_ffn_size
        gu = self.matmul(x, f"{p}.gate_up", 2 * S, D,
                         lambda: np.concatenate([self.src.dense("shared_gate", i), self.src.dense("shared_up", i)]))
        gate, up = t.op_multi_out("Split", [gu, self.const(f"{p}.split", np.array([S, S], np.int64))], dict(axis=-1),
                                  num_outputs=2)
        act = t.op("Mul", [t.op("Mul", [gate, t.op("Sigmoid", [gate])]), up])
        y = self.matmul(act, f"{p}.down", D, S, lambda: self.src.dense("shared_down", i))
        g = self.lazy(f"{p}.router.weight_t", self.ir.DataType.FLOAT, (D, 1),
                      lambda: np.ascontiguousarray(self.src.dense("shared_router", i).T))
        return t.op("Mul", [y, t.op("Sigmoid", [t.op("MatMul", [x, g])])])


def write_onnx(source, out_dir: Path, wtype: str, *, progress=None) -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` for ``source`` into ``out_dir``; returns the facts
    the runtime needs (kept in the bundle's manifest)."""
    import onnx_ir as ir

    if wtype not in TYPES:
        raise ValueError(f"unknown ONNX weight type {wtype!r}")
    spec = source.spec
    max_context = min(spec.context_length, MAX_CONTEXT)
    model = _Builder(source, wtype).build(max_context)
    n = len(model.graph.initializers)
    done = [0]

    def tick(tensor, info) -> None:
        done[0] += 1
        if progress:
            progress(f"writing ONNX weights ({wtype})", done[0], n)

    ir.save(model, out_dir / "model.onnx", external_data="model.onnx.data", callback=tick, max_workers=1,
            alignment=4096)
    return {"graph_version": GRAPH_VERSION, "weight_type": wtype, "block_size": BLOCK if wtype != "f32" else None,
            "max_context": max_context,
            "opset": OPSET, "layers": spec.n_layers}


def current(bundle: Path) -> bool:
    """Whether a cached ONNX bundle was written by this version of the graph."""
    import json

    try:
        facts = json.loads((bundle / "manifest.json").read_text()).get("onnx") or {}
    except (OSError, ValueError):
        return False
    return facts.get("graph_version") == GRAPH_VERSION
