"""BitStack decomposition on the default model's real attention matrices: blocks, packing, ordering."""

from __future__ import annotations

import numpy as np
import pytest

from edge.quant.bitstack import (
    Block,
    activation_scales,
    block_bytes,
    decompose,
    levels_at,
    order_by_error,
    order_by_loss,
    reconstruct,
)

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def wq():
    from edge.formats.hf import load_weights
    from edge.models import default_model_path

    return np.asarray(load_weights(default_model_path()).layers[1].wq, dtype=np.float32)


def test_more_blocks_approximate_better_and_reach_the_matrix(wq):
    scales = np.ones(wq.shape[1], np.float32)
    blocks, errors = decompose(wq, scales, n_blocks=12, k=16)
    assert all(b < a for a, b in zip(errors, errors[1:]))  # every block removes error
    rel = [np.linalg.norm(reconstruct(blocks[:j], scales) - wq) / np.linalg.norm(wq) for j in (1, 4, 12)]
    assert rel[0] > rel[1] > rel[2] and rel[2] < 0.02
    # the reported errors are those of the stored (fp16) blocks
    assert errors[4] == pytest.approx(float(((reconstruct(blocks[:4], scales) - wq) ** 2).sum()), rel=1e-3)


def test_a_block_is_about_one_bit_per_weight_and_round_trips_through_bytes(wq):
    m, n = wq.shape
    blocks, _ = decompose(wq, np.ones(n, np.float32), n_blocks=2, k=16)
    blk = blocks[1]
    assert blk.nbytes == block_bytes((m, n), 16) == m * n // 8 + 2 * 16 * (m + n)
    back = Block.from_buffer(blk.to_bytes(), (m, n), 16)
    assert np.array_equal(back.term(), blk.term())
    signs = np.unpackbits(blk.signs, bitorder="little").reshape(m, n)
    assert set(np.unique(signs)) <= {0, 1} and 0.3 < signs.mean() < 0.7


def test_activation_scaling_protects_loud_inputs(wq):
    m, n = wq.shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, n)).astype(np.float32)
    x[..., :8] *= 20  # eight loud input channels
    s = activation_scales(x)
    assert s[:8].min() > 10 * s[8:].max()
    plain = reconstruct(decompose(wq, np.ones(n, np.float32), n_blocks=2)[0], np.ones(n, np.float32))
    aware = reconstruct(decompose(wq, s, n_blocks=2)[0], s)
    x2 = x.reshape(-1, n)
    err = lambda w: float(np.linalg.norm(x2 @ (w - wq).T))  # noqa: E731
    assert err(aware) < err(plain)  # the output error on such inputs is what the scaling lowers


def test_orderings_keep_each_stack_in_order_and_cover_every_block():
    errors = [[10, 4, 2, 1], [8, 7, 6.5, 6.3], [30, 5, 4, 3.9]]
    nbytes = [100, 100, 300]
    order = order_by_error(errors, nbytes, min_blocks=1, relative=False)
    assert sorted((o.matrix, o.level) for o in order) == [(j, lv) for j in range(3) for lv in range(3)]
    for j in range(3):
        assert [o.level for o in order if o.matrix == j] == [0, 1, 2]
    assert levels_at(order, 3, 3) == [1, 1, 1]  # every matrix first gets its base block
    assert (order[3].matrix, order[3].level) == (0, 1)  # then the largest error drop per byte
    # The loss-guided ordering on a loss that is exactly the summed error picks the same blocks.
    loss = lambda lv: sum(errors[j][lv[j]] for j in range(3))  # noqa: E731
    assert order_by_loss([3, 3, 3], nbytes, loss, min_blocks=1) == order
    # The relative proxy (the default) is the same greedy choice on each matrix's error share.
    rel_loss = lambda lv: sum(errors[j][lv[j]] / errors[j][0] for j in range(3))  # noqa: E731
    relative = order_by_error(errors, nbytes, min_blocks=1)
    assert order_by_loss([3, 3, 3], nbytes, rel_loss, min_blocks=1) == relative


def test_relative_ordering_does_not_let_a_loud_matrix_take_every_block():
    # matrix 1 has 100x the scaled error of matrix 0 but corrects a smaller share per block
    errors = [[1.0, 0.5, 0.25, 0.125], [100.0, 70.0, 49.0, 34.3]]
    absolute = order_by_error(errors, [1, 1], relative=False)
    relative = order_by_error(errors, [1, 1])
    assert [o.matrix for o in absolute[2:4]] == [1, 1]  # absolute: the loud matrix takes all it has
    assert [o.matrix for o in relative[2:4]] == [0, 1]  # relative: the larger share of its own matrix
