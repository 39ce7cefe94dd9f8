"""Nested-bit expert records: every byte prefix is a complete lower-bit expert."""

from __future__ import annotations

import numpy as np
import pytest

from edge.formats.hf import load_weights
from edge.quant.nested import MAX_BITS, NestedLayout, decode, encode, is_routed_expert, quantize_codes, rtn


@pytest.fixture(scope="module")
def expert(default_dir):
    lw = load_weights(default_dir).layers[1]
    mats = [lw.gate[3], lw.up[3], lw.down[3]]
    return mats, NestedLayout(tuple(m.shape for m in mats))


def test_prefix_decodes_exactly_like_the_full_record(expert):
    mats, layout = expert
    record = encode(mats)
    assert len(record) == layout.record_bytes
    for bits in range(2, MAX_BITS + 1):
        n = layout.prefix_bytes(bits)
        short = decode(record[:n], layout, bits)
        full = decode(record, layout, bits)
        assert all(np.array_equal(a, b) for a, b in zip(short, full))
        with pytest.raises(ValueError):
            decode(record[: n - 1], layout, bits)  # one byte short is not enough


def test_fewer_bits_read_fewer_bytes(expert):
    _, layout = expert
    sizes = [layout.prefix_bytes(b) for b in range(2, 9)]
    assert all(b - a == layout.plane_bytes for a, b in zip(sizes, sizes[1:]))
    assert layout.prefix_bytes(2) * 3 < layout.prefix_bytes(8)
    assert layout.plane_bytes * 8 == layout.n_weights


def test_error_halves_with_each_bit_and_8_bit_is_within_half_a_step(expert):
    mats, layout = expert
    record = encode(mats)
    errs = []
    for bits in range(2, 9):
        dec = decode(record, layout, bits)
        errs.append(max(float(np.abs(a - b).max()) for a, b in zip(mats, dec)))
    assert all(b < a * 0.7 for a, b in zip(errs, errs[1:]))
    _, scale, _ = quantize_codes(mats[0])
    dec8 = decode(record, layout, 8)[0]
    step = np.repeat(scale.astype(np.float32), 64, axis=1)
    assert (np.abs(dec8 - mats[0]) <= step * 0.5 + 1e-3 * np.abs(mats[0]) + 1e-6).all()


def test_nested_4_bit_is_as_accurate_as_round_to_nearest(expert):
    mats, layout = expert
    dec = decode(encode(mats), layout, 4)
    nested = np.mean([np.mean((a - b) ** 2) for a, b in zip(mats, dec)])
    plain = np.mean([np.mean((a - rtn(a, 4)) ** 2) for a in mats])
    assert nested < plain * 1.05


def test_only_routed_experts_are_quantized():
    assert is_routed_expert("layers.0.gate") and is_routed_expert("layers.3.down")
    for name in ("layers.0.router", "layers.0.shared_gate", "layers.0.wq", "embed", "lm_head", "layers.1.ffn_norm"):
        assert not is_routed_expert(name)


def test_group_must_divide_the_input_size():
    with pytest.raises(ValueError, match="multiple of the group size"):
        NestedLayout(((4, 100),))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_native_and_numpy_q4_1_conversion_agree(expert, bits):
    from edge import _native
    from edge.quant.nested import _sections, _to_q4_1_numpy, to_q4_1

    if _native.nested_to_q4_1 is None:
        pytest.skip("native helper not built (no C compiler at install)")
    mats, layout = expert
    record = encode(mats)
    native = to_q4_1(record, layout, bits)
    header, top, planes = _sections(record, layout, bits)
    s, z = header[:, 0].astype(np.float32), header[:, 1].astype(np.float32)
    shift = 8 - bits
    d16, m16 = (s * float(1 << shift)).astype("<f2"), (z + s * (((1 << shift) - 1) / 2.0)).astype("<f2")
    ref = _to_q4_1_numpy(top, planes, layout.n_weights, bits, d16, m16,
                         np.empty_like(native), None)
    assert np.array_equal(native, ref)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_q4_1_blocks_dequantize_to_the_nested_decode(expert, bits):
    import gguf
    from gguf.quants import dequantize

    from edge.quant.nested import to_q4_1

    mats, layout = expert
    record = encode(mats)
    blocks = to_q4_1(record, layout, bits)
    r, c = layout.shapes[0]
    got = dequantize(blocks[: r * c // 32 * 20], gguf.GGMLQuantizationType.Q4_1).reshape(r, c)
    want = decode(record, layout, bits)[0]
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()  # fp16 rounding of the block offset
