"""Float64 evaluation of merge formulas together with a bound on the error of a float32 evaluation of them.

Pure functions on tensors, used by `verify`'s reference: each returns the exact value of its step (float64) and
adds to `e` how far a float32 evaluation of the same step (any summation order) can drift from it. Nothing here
is used by the merge itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64
U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
# A float32 dot product of length n is within n*u/(1 - n*u) * sum|x_i*y_i| of the exact one (any summation order);
# each further operation (scale, add, the scale's own rounding to float32) adds one u. SLACK doubles the total to
# cover the second-order terms the per-step bounds leave out.
SLACK = 2.0

Pair = tuple[Tensor, Tensor, Tensor, Tensor]


def gamma(n: int) -> float:
    """Bound on the relative error of n float32 roundings in a row (with SLACK)."""
    nu = n * U32
    return SLACK * nu / (1.0 - nu)


class Workspace:
    """Scratch buffers reused by every row block: fresh allocations of this size would page-fault every time."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = F64) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


def make_pair(left: Tensor, right: Tensor) -> Pair:
    """(left, right, row norms of left, column norms of right) of a product `left @ right`."""
    left, right = left.contiguous(), right.contiguous()
    return (left, right, torch.linalg.vector_norm(left, dim=1, keepdim=True),
            torch.linalg.vector_norm(right, dim=0, keepdim=True))


def add_product(x: Tensor, e: Tensor, pair: Pair, i0: int, i1: int, scale: float, ws: Workspace,
                extra: int = 0) -> tuple[Tensor, Tensor]:
    """x += s * left[i0:i1] @ right in place, and e += its float32 bound: the dot products (length k) plus the
    scale, its rounding and the addition (`extra` more roundings of the factors themselves, e.g. VeRA's lambdas).

    sum_j |left_ij| |right_jk| is bounded by ||left_i|| * ||right_:k|| (Cauchy-Schwarz): a rank-one product
    instead of a second matmul, at most sqrt(k) times looser.
    """
    left, right, left_norms, right_norms = pair
    left, left_norms = left[i0:i1], left_norms[i0:i1]
    tmp = ws.get("tmp", x.shape)
    absx = ws.get("absx", x.shape)
    torch.mul(left_norms, right_norms, out=tmp)
    tmp.mul_(abs(scale)).add_(torch.abs(x, out=absx)).mul_(gamma(left.shape[1] + 3 + extra))
    e.add_(tmp)
    torch.mm(left, right, out=tmp)
    x.add_(tmp, alpha=scale)
    return x, e


def add_elementwise(x: Tensor, e: Tensor, d: Tensor, mag: Tensor, scale: float,
                    roundings: int) -> tuple[Tensor, Tensor]:
    """x + s * d, where the float32 evaluation of `d` takes `roundings` roundings per term of magnitude `mag`."""
    e = e + gamma(roundings) * (x.abs() + abs(scale) * mag)
    return x + scale * d, e


def scale_by(x: Tensor, e: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """x * v (broadcast), one rounding."""
    y = x * v
    return y, e * v.abs() + gamma(1) * y.abs()


def dora(x: Tensor, e: Tensor, m: Tensor, norm: Tensor, e_norm: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """DoRA `V * (m / ||V||)` with the norm along the axis `norm` was taken on (n terms), and its float32 bound:
    the norm is off by the error already in V plus n roundings, the quotient and product by one each."""
    d_norm = e_norm + gamma(n + 2) * (norm + e_norm)
    rel = d_norm / (norm - d_norm).clamp_min(torch.finfo(F64).tiny) + gamma(2)
    f = m / norm
    y = x * f
    return y, f.abs() * (1 + rel) * e + y.abs() * (rel + gamma(1))
