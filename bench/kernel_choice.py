"""Expert kernels: ggml Q4_1 (through ctypes) against ONNX Runtime MatMulNBits and numpy, measured
as the offload engine uses them — GEMV time *and* the cost of turning a freshly read nested
record into the kernel's format.

    python bench/kernel_choice.py [--rows 2816 --cols 1024 --threads 2 --reps 50]
    python bench/kernel_choice.py --expert 2048 768    # a whole expert: ggml's three GEMVs vs ORT's QMoE

Results: docs/kernels.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import _native  # noqa: E402
from edge.quant.nested import NestedLayout, _codes, _sections, _to_q4_1_numpy, decode, encode, to_q4_1  # noqa: E402
from edge.runtime.ggml import Q4_1, Graph, Weight  # noqa: E402


def med(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def ort_session(codes: np.ndarray, d: np.ndarray, m: np.ndarray, rows: int, cols: int, threads: int):
    """MatMulNBits (4 bits, block 32, accuracy_level 4) with B as a constant initializer."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).astype(np.uint8).reshape(rows, cols // 32, 16)
    zp = (-m / d).astype(np.float32)  # w = d * q + m = d * (q - zp)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=cols, N=rows, bits=4, block_size=32, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, rows])],
        initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(d.astype(np.float32), "scales"),
                     numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_int_session(w: np.ndarray, threads: int):
    """MatMulNBits on ORT's fast path: W re-quantized by ONNX Runtime's own quantizer (integer zero
    points), B a constant initializer, accuracy_level 4."""
    from onnx import TensorProto, helper, numpy_helper

    from edge.formats.onnx_quant import quantize

    rows, cols = w.shape
    q = quantize(w, 4, 32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=cols, N=rows, bits=4, block_size=32, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, rows])],
        initializer=[numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales"),
                     numpy_helper.from_array(q.zeros, "zp")])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                            helper.make_opsetid("com.microsoft", 1)]), threads)


def qmoe_session(gate: np.ndarray, up: np.ndarray, down: np.ndarray, threads: int, accuracy: int):
    """One expert as ONNX Runtime's QMoE runs it (E = 1, k = 1, block-wise int4, fused SwiGLU), as
    edge's ONNX bundles hold experts (edge/builder/onnx_graph.py)."""
    from onnx import TensorProto, helper, numpy_helper

    from edge.formats.onnx_quant import interleave_rows, quantize

    F, D = gate.shape
    q1, q2 = quantize(interleave_rows(gate, up), 4, 32), quantize(down, 4, 32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (q1.packed.reshape(1, 2 * F, D // 2), "w1"), (q1.scales[None], "s1"), (q2.packed.reshape(1, D, F // 2), "w2"),
        (q2.scales[None], "s2"), (q1.zeros[None], "z1"), (q2.zeros[None], "z2"),
        (np.zeros((1, 1), np.float32), "router"))]
    node = helper.make_node("QMoE", ["A", "router", "w1", "s1", "", "w2", "s2", "", "", "", "", "z1", "z2"], ["Y"],
                            domain="com.microsoft", k=1, expert_weight_bits=4, block_size=32,
                            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                            normalize_routing_weights=1, accuracy_level=accuracy)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, D])], initializer=inits)
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                            helper.make_opsetid("com.microsoft", 1)]), threads)


def expert_rows(D: int, F: int, threads: int, reps: int) -> None:
    """A whole expert (gate, up [F x D], down [D x F]) at 4 bits: ggml's three Q4_1 GEMVs (one graph,
    as the offload engine computes them) against ONNX Runtime's QMoE on one expert, and what each
    costs to bring a freshly read expert in (ggml: nested record -> Q4_1 in place; ORT: float
    weights quantized by ORT's quantizer into a new session, since its weights are initializers)."""
    rng = np.random.default_rng(0)
    gate, up, down = ((rng.standard_normal(shape) * 0.02).astype(np.float32) for shape in ((F, D), (F, D), (D, F)))
    x = rng.standard_normal((1, D)).astype(np.float32)
    layouts = [NestedLayout(((F, D),)), NestedLayout(((F, D),)), NestedLayout(((D, F),))]
    records = [encode([m]) for m in (gate, up, down)]
    ws = [Weight(Q4_1, F, D), Weight(Q4_1, F, D), Weight(Q4_1, D, F)]

    def ggml_load():
        for r, lay, w in zip(records, layouts, ws):
            to_q4_1(r, lay, 4, out=w.data)

    ggml_load()

    def ggml_expert():
        g = Graph(1 << 20)
        h = g.input(x)
        g.compute([g.matmul(ws[0], h), g.matmul(ws[1], h)], threads=threads)
        g2 = Graph(1 << 20)
        g2.compute([g2.matmul(ws[2], g2.input(np.zeros((1, F), np.float32)))], threads=threads)

    print(f"one expert, hidden {D}, FFN {F}, 4-bit, batch 1, {threads} threads, median of {reps}")
    print(f"{'kernel':44s} {'expert ms':>9s} {'load ms':>8s}")
    print(f"{'ggml Q4_1 x3 (gate+up graph, down graph)':44s} {med(ggml_expert, reps):9.3f} {med(ggml_load, reps):8.2f}")
    for acc in (0, 4):
        sess = qmoe_session(gate, up, down, threads, acc)
        feed = {"A": x}
        load = med(lambda: qmoe_session(gate, up, down, threads, acc), max(3, reps // 10))
        name = f"ORT QMoE int4, accuracy_level {acc}"
        print(f"{name:44s} {med(lambda: sess.run(None, feed), reps):9.3f} {load:8.2f}")
    ints = [ort_int_session(m, threads) for m in (gate, up, down)]
    feeds = [{"A": x}, {"A": x}, {"A": np.zeros((1, F), np.float32)}]

    def ort_three():
        for sess, feed in zip(ints, feeds):
            sess.run(None, feed)

    load = med(lambda: [ort_int_session(m, threads) for m in (gate, up, down)], max(3, reps // 10))
    print(f"{'ORT MatMulNBits x3, integer zero points':44s} {med(ort_three, reps):9.3f} {load:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--expert", type=int, nargs=2, metavar=("HIDDEN", "FFN"),
                    help="time a whole expert: ggml's three GEMVs against ORT's QMoE")
    args = ap.parse_args()
    if args.expert:
        expert_rows(*args.expert, args.threads, args.reps)
        return
    R, C = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((R, C)) * 0.02).astype(np.float32)
    layout = NestedLayout(((R, C),))
    record = encode([w])
    x = rng.standard_normal((1, C)).astype(np.float32)
    rows = []

    # ggml Q4_1: conversion writes straight into the tensor's memory.
    gw = Weight(Q4_1, R, C)
    conv = med(lambda: to_q4_1(record, layout, 4, out=gw.data), args.reps)
    header, top, planes = _sections(record, layout, 4)
    s, z = header[:, 0].astype(np.float32), header[:, 1].astype(np.float32)
    d16, m16 = (s * 16.0).astype("<f2"), (z + s * 7.5).astype("<f2")
    scratch = np.empty(R * C, np.uint8)
    conv_np = med(lambda: _to_q4_1_numpy(top, planes, R * C, 4, d16, m16, gw.data, scratch), args.reps)

    def ggml_gemv():
        g = Graph(1 << 20)
        g.compute([g.matmul(gw, g.input(x))], threads=args.threads)

    gemv = med(ggml_gemv, args.reps)
    native = "native C" if _native.nested_to_q4_1 is not None else "numpy (native helper not built)"
    rows.append(("ggml Q4_1 (ctypes)", gemv, conv, f"nested -> Q4_1 blocks, {native}"))
    rows.append(("ggml Q4_1 (ctypes)", gemv, conv_np, "nested -> Q4_1 blocks, numpy table look-ups"))

    # ONNX Runtime MatMulNBits: codes and block constants, then a session per expert.
    blocks = to_q4_1(record, layout, 4).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32).ravel()
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32).ravel()
    codes = _codes(top, planes, 4, R * C).reshape(R, C)

    def ort_build():
        return ort_session(codes, d, m, R, C, args.threads)

    build = med(ort_build, max(3, args.reps // 10))
    sess = ort_build()
    feed = {"A": x}
    rows.append(("ONNX Runtime MatMulNBits 4-bit", med(lambda: sess.run(None, feed), args.reps), build,
                 "codes -> ONNX model -> InferenceSession"))
    y_ort = sess.run(None, feed)[0]

    # numpy float32: decode the record to floats.
    wf = decode(record, layout, 4)[0]
    rows.append(("numpy float32", med(lambda: x @ wf.T, args.reps), med(lambda: decode(record, layout, 4), 5),
                 "nested -> float32 matrix"))
    g = Graph(1 << 20)
    y_ggml = g.compute([g.matmul(gw, g.input(x))], threads=args.threads)[0]
    y_ref = x @ wf.T
    print(f"one expert matrix [{R} x {C}], 4-bit, batch 1, {args.threads} threads, median of {args.reps}")
    print(f"{'kernel':32s} {'GEMV ms':>8s} {'load ms':>8s}  load step")
    for name, gemv, load, step in rows:
        print(f"{name:32s} {gemv:8.3f} {load:8.2f}  {step}")
    print(f"max |error| vs float decode: ggml {np.abs(y_ggml - y_ref).max():.2e}, "
          f"ORT {np.abs(y_ort - y_ref).max():.2e} (|y| max {np.abs(y_ref).max():.2e})")


if __name__ == "__main__":
    main()
