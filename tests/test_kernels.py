"""The merge math (streammerge/kernels.py) against matrices worked out by hand.

Small integer-valued factors keep every product exact in float32, so the expected values are exact too.
"""

from __future__ import annotations

import pytest
import torch

from streammerge import kernels

F = torch.float32


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F)


def test_add_lora_rows_is_w_plus_s_b_a():
    w = t([[1, 2, 3], [4, 5, 6]])
    a = t([[1, 0, 2]])            # [r=1, in=3]
    b = t([[3], [-1]])            # [out=2, r=1]
    # B @ A = [[3, 0, 6], [-1, 0, -2]]; s = 0.5
    kernels.add_lora_rows(w, a, b, 0.5)
    assert torch.equal(w, t([[2.5, 2, 6], [3.5, 5, 5]]))


def test_add_lora_rows_on_a_block_uses_the_blocks_rows_of_b():
    a = t([[1, 1]])
    b = t([[1], [2], [3]])
    w = torch.zeros(2, 2)
    kernels.add_lora_rows(w, a, b[1:3], 2.0)      # rows 1..2 of the weight
    assert torch.equal(w, t([[4, 4], [6, 6]]))


def test_add_lora_rows_at_covers_only_the_modules_rows():
    # a module owning rows 1..2 of a 4-row fused weight; the block holds rows 2..3
    a = t([[1, 2]])
    b = t([[1], [10]])            # delta rows: [[1, 2], [10, 20]] for rows 1, 2
    w = torch.zeros(2, 2)
    kernels.add_lora_rows_at(w, 2, a, b, (1, 3), 1.0)
    assert torch.equal(w, t([[10, 20], [0, 0]]))


def test_add_lora_cols_is_the_transposed_delta():
    # Conv1D / embedding: W [in=3, out=2] += (B @ A)^T * s
    w = torch.zeros(3, 2)
    a = t([[1, 2, 3]])            # [r, in]
    b = t([[1], [-1]])            # [out, r]
    kernels.add_lora_cols(w, a, b, 2.0)
    assert torch.equal(w, t([[2, -2], [4, -4], [6, -6]]))
    w2 = torch.zeros(2, 2)
    kernels.add_lora_cols(w2, a[:, 1:3], b, 1.0)   # rows 1..2 of the same weight
    assert torch.equal(w2, t([[2, -2], [3, -3]]))


def test_add_hadamard_rows_is_the_elementwise_product():
    w = torch.zeros(2, 2)
    w1a, w1b = t([[1], [2]]), t([[1, 3]])      # w1a @ w1b = [[1, 3], [2, 6]]
    w2a, w2b = t([[2], [1]]), t([[1, -1]])     # w2a @ w2b = [[2, -2], [1, -1]]
    kernels.add_hadamard_rows(w, w1a, w1b, w2a, w2b, 0.5)
    assert torch.equal(w, t([[1, -3], [1, -3]]))


def test_add_kron_rows_is_the_kronecker_product():
    w1, w2 = t([[1, 2]]), t([[1], [3]])        # kron = [[1, 2], [3, 6]]
    w = torch.zeros(1, 2)
    kernels.add_kron_rows(w, w1, w2, 1, 2, 2.0)  # row 1 only
    assert torch.equal(w, t([[6, 12]]))
    full = torch.zeros(2, 2)
    kernels.add_kron_rows(full, w1, w2, 0, 2, 1.0)
    assert torch.equal(full, torch.kron(w1, w2))


def test_scale_rows_and_cols():
    w = t([[1, 2], [3, 4]])
    assert torch.equal(kernels.scale_rows(w.clone(), t([2, -1])), t([[2, 4], [-3, -4]]))
    assert torch.equal(kernels.scale_cols(w.clone(), t([2, -1])), t([[2, -2], [6, -4]]))


@pytest.mark.parametrize("transpose", [False, True])
def test_add_expert_delta(transpose):
    a_e, b_e = t([[1, 2, 3]]), t([[1], [2]])   # B_e @ A_e = [[1, 2, 3], [2, 4, 6]] ([out=2, in=3])
    w = torch.zeros(6)
    kernels.add_expert_delta(w, a_e, b_e, 1.0, transpose)
    expected = t([[1, 2, 3], [2, 4, 6]])
    assert torch.equal(w, (expected.T if transpose else expected).reshape(-1))


def test_bias_tokens_and_finiteness():
    assert torch.equal(kernels.add_scaled(t([[1], [2]]), t([[4], [6]]), 0.5), t([[3], [5]]))
    w = torch.zeros(3, 2)
    kernels.replace_rows(w, torch.tensor([2, 0]), t([[7, 8], [1, 2]]))
    assert torch.equal(w, t([[1, 2], [0, 0], [7, 8]]))
    assert kernels.all_finite(t([1, 2])) and not kernels.all_finite(t([1, float("nan")]))
    assert kernels.nonfinite_count(t([float("inf"), 1, float("-inf"), float("nan")])) == 3


def test_dora_rows_and_cols():
    # rows: each row scaled to the magnitude m (norm over the row)
    w = t([[3, 4], [0, 2]])
    assert torch.equal(kernels.dora_rows(w.clone(), t([10, 1])), t([[6, 8], [0, 1]]))
    # cols: norms over every row of a column, from the per-block sums of squares
    sq = kernels.column_sq_norms(t([[3, 0]])) + kernels.column_sq_norms(t([[4, 2]]))
    assert torch.equal(sq, t([25, 4]))
    assert torch.equal(kernels.dora_cols(t([[3, 0], [4, 2]]), t([10, 1]), sq.sqrt()), t([[6, 0], [8, 1]]))


def test_tile_rows_bounds_the_tile_to_4_mib():
    assert kernels.tile_rows(1) == 64
    assert kernels.tile_rows(1 << 20) == 1
    assert kernels.tile_rows(1 << 15) == 32
