"""ggml's CPU kernels through edge's ctypes wrapper, for every weight type edge runs from a GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from edge.runtime import ggml


@pytest.mark.parametrize("name", ggml.COMPUTABLE)
def test_each_weight_type_multiplies_like_its_dequantized_matrix(name):
    from gguf.quants import dequantize

    gtype = ggml.type_id(name)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    weight = ggml.Weight.quantized(w, gtype)
    ref = np.asarray(dequantize(weight.data.copy(), gtype), np.float32).reshape(64, 512)  # gguf-py's own decoder
    assert np.abs(ref - w).max() < 2.5  # it is this matrix, quantized (2-bit K-quants are coarse)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    g = ggml.Graph()
    out = g.compute([g.matmul(weight, g.input(x))], threads=2)[0]
    want = x @ ref.T
    # ggml quantizes the activations for the quantized dot products (Q8_0/Q8_K): ~1% error
    assert np.abs(out - want).max() < 0.02 * np.abs(want).max(), name
    g = ggml.Graph()
    rows = g.compute([g.get_rows(weight, np.array([5, 0, 63]))], threads=1)[0]
    assert np.allclose(rows, ref[[5, 0, 63]], atol=1e-6 * max(1.0, float(np.abs(ref).max()))), name


def test_a_weight_can_point_at_other_bytes():
    rng = np.random.default_rng(1)
    a, b = (ggml.Weight.quantized(rng.standard_normal((32, 256)).astype(np.float32), ggml.Q8_0) for _ in range(2))
    x = rng.standard_normal((1, 256)).astype(np.float32)
    view = ggml.Weight(ggml.Q8_0, 32, 256, buffer=a.data)

    def apply(w):
        g = ggml.Graph()
        return g.compute([g.matmul(w, g.input(x))], threads=1)[0]

    assert np.array_equal(apply(view), apply(a))
    view.point_at(b.data)
    assert np.array_equal(apply(view), apply(b))
    with pytest.raises(ValueError, match="cannot hold"):
        view.point_at(b.data[:100])
