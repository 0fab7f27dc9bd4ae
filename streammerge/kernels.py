"""Merge math as pure functions on float32 tensors.

Every function works on a block of rows `[r0, r1)` of a weight viewed as 2-D `[rows, cols]` (ConvNd kernels are
flattened into cols), so callers can stream any tensor in blocks that stay in cache. Factors are float32 (PEFT
upcasts the adapter to float32 by default), the weight block is float32, and the caller rounds once to the output
dtype at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tile_rows(cols: int) -> int:
    """Rows per matmul tile for a weight with `cols` columns.

    BLAS picks its kernel (and so its summation order) from the matrix shape, so `B[r0:r1] @ A` over a
    different number of rows can differ in the last bit. Products are therefore always taken over the same
    absolute row tiles, and row blocks are whole tiles: the output bytes never depend on the block size.
    """
    return max(1, min(64, (1 << 22) // max(1, cols * 4)))


def add_lora_rows(w: Tensor, a: Tensor, b_rows: Tensor, scale: float, tmp: Tensor | None = None) -> Tensor:
    """`w += (B[r0:r1] @ A) * s` for a row block of an `[out, in]` weight (Linear, ConvNd flattened).

    The block must start on a tile boundary (see `tile_rows`). `tmp` (same shape as `w`) receives the delta,
    so blocks reuse one buffer.
    """
    d = tmp if tmp is not None else torch.empty_like(w)
    tile = tile_rows(w.shape[1])
    for i in range(0, w.shape[0], tile):
        torch.mm(b_rows[i:i + tile], a, out=d[i:i + tile])
    d.mul_(scale)
    w.add_(d)
    return w


def add_lora_rows_at(w: Tensor, r0: int, a: Tensor, b: Tensor, rows: tuple[int, int], scale: float) -> Tensor:
    """`w += (B @ A) * s` where the delta covers only rows `[o0, o1)` of the whole weight and `w` is its row block
    starting at `r0` (a module cut out of a fused tensor).

    Products are taken over tiles of the delta's own rows, counted from `o0`, so the bytes do not depend on
    where the row blocks fall.
    """
    o0, o1 = rows
    lo, hi = max(r0, o0), min(r0 + w.shape[0], o1)
    if lo >= hi:
        return w
    tile = tile_rows(w.shape[1])
    for t0 in range((lo - o0) // tile * tile, hi - o0, tile):
        t1 = min(t0 + tile, o1 - o0)
        d = torch.mm(b[t0:t1], a).mul_(scale)
        s0, s1 = max(t0, lo - o0), min(t1, hi - o0)
        w[s0 + o0 - r0:s1 + o0 - r0].add_(d[s0 - t0:s1 - t0])
    return w


def add_lora_cols(w: Tensor, a_cols: Tensor, b: Tensor, scale: float) -> Tensor:
    """`w += (A[:, r0:r1].T @ B.T) * s`: a row block of `(B @ A).T * s`, tiled like `add_lora_rows`.

    Used where the stored weight is the transpose of `B @ A`: GPT-2 Conv1D (`[in, out]`) and embeddings
    (`[vocab, dim]` with `A [r, vocab]`, `B [dim, r]`).
    """
    d = torch.empty_like(w)
    bt = b.T
    tile = tile_rows(w.shape[1])
    for i in range(0, w.shape[0], tile):
        torch.mm(a_cols[:, i:i + tile].T, bt, out=d[i:i + tile])
    d.mul_(scale)
    w.add_(d)
    return w


def add_hadamard_rows(w: Tensor, w1a_rows: Tensor, w1b: Tensor, w2a_rows: Tensor, w2b: Tensor,
                      scale: float) -> Tensor:
    """LoHa: `w += ((w1a @ w1b) * (w2a @ w2b)) * s` for a row block, products over fixed row tiles."""
    tile = tile_rows(w.shape[1])
    for i in range(0, w.shape[0], tile):
        d = (w1a_rows[i:i + tile] @ w1b) * (w2a_rows[i:i + tile] @ w2b)
        w[i:i + tile] += d * scale
    return w


def add_kron_rows(w: Tensor, w1: Tensor, w2: Tensor, r0: int, r1: int, scale: float) -> Tensor:
    """LoKr: rows `[r0, r1)` of `kron(w1, w2) * s` added to `w` (row `i` is `w1[i // m] (x) w2[i % m]`)."""
    m = w2.shape[0]
    idx = torch.arange(r0, r1)
    rows = w1[idx // m].unsqueeze(2) * w2[idx % m].unsqueeze(1)
    w += rows.reshape(r1 - r0, -1) * scale
    return w


def scale_rows(w: Tensor, v_rows: Tensor) -> Tensor:
    """IA3 on outputs: `w[i, :] *= l[i]`."""
    w *= v_rows.reshape(-1, 1)
    return w


def scale_cols(w: Tensor, v: Tensor) -> Tensor:
    """IA3 on inputs (feed-forward layers): `w[:, j] *= l[j]`."""
    w *= v.reshape(1, -1)
    return w


def add_expert_delta(w_flat: Tensor, a_e: Tensor, b_e: Tensor, scale: float, transpose: bool) -> Tensor:
    """One expert of a fused `[E, d1, d2]` parameter, flattened: `w += (B_e @ A_e) * s` (transposed when the
    stored layout is `[E, in, out]`)."""
    d = (b_e @ a_e) * scale
    w_flat += (d.T if transpose else d).reshape(-1)
    return w_flat


def add_scaled(w: Tensor, v: Tensor, scale: float) -> Tensor:
    """`w += s * v` (lora_B.bias onto a bias)."""
    w += v * scale
    return w


def replace_rows(w: Tensor, local_rows: Tensor, values: Tensor) -> Tensor:
    """`w[local_rows] = values` (trainable tokens: the saved rows are new values, not deltas)."""
    w[local_rows] = values
    return w


def dora_rows(w: Tensor, magnitude_rows: Tensor) -> Tensor:
    """DoRA with the norm per row of the block: `w * (m / ||w||_row)` (Linear `[out, in]`, ConvNd)."""
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    w *= magnitude_rows.reshape(-1, 1) / norm
    return w


def column_sq_norms(w: Tensor) -> Tensor:
    """Sum of squares per column of a block; summed over all blocks it gives DoRA's column norms."""
    return (w * w).sum(dim=0)


def dora_cols(w: Tensor, magnitude: Tensor, col_norms: Tensor) -> Tensor:
    """DoRA with the norm per column over all rows (Conv1D `[in, out]`, embeddings `[vocab, dim]`)."""
    w *= (magnitude.reshape(-1) / col_norms).reshape(1, -1)
    return w


def all_finite(t: Tensor) -> bool:
    """True when no element is NaN or +-Inf: one reduction, exact count only when the sum says otherwise."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or nonfinite_count(t) == 0


def nonfinite_count(t: Tensor) -> int:
    """How many elements are NaN or +-Inf."""
    if not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())
