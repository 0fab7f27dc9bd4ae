"""A weighted combination of LoRA deltas on one output tensor: `W += Σ w_i · s_i · B_i @ A_i`.

This is PEFT's `add_weighted_adapter(..., combination_type="cat")` followed by a merge: per module PEFT
concatenates `A_i * w_i * s_i` (float32, in that order: two roundings) along the rank and the `B_i` beside them
into one adapter of rank `R = Σ r_i` and alpha `R`, whose own scale `R / R` is exactly 1, so its merge adds
`B_cat @ A_cat`. The operation does the same on the concatenated factors (zero padding PEFT adds for ranks below
R contributes exact zeros and is left out). Not a PEFT adapter type of its own: planning (plan/combine.py) builds
it from the LoRA operations the adapters' own plans made for the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..bounds import add_product
from .base import Block, Factors, Op, Prepared, Reference

# roundings of each concatenated A entry before the product: the weight and the scale rounded to float32, and
# the two products A * w and (A * w) * s
_FACTOR_ROUNDINGS = 4


@dataclass(frozen=True)
class Term:
    """One adapter's LoRA pair on the tensor: its factor keys (as the combined adapter names them), its weight in
    the combination and its own scale `s_i`."""

    a: str
    b: str
    weight: float
    scale: float
    module: str


@dataclass(frozen=True)
class WeightedLora(Op):
    """`W += Σ w_i s_i B_i @ A_i` on rows (`[out, in]` weights, ConvNd flattened) or, with `cols`, transposed
    (`(B @ A)^T`: Conv1D `[in, out]` and embedding `[vocab, dim]` weights). `out_rows`: the delta covers only
    these rows of W (a module cut out of a fused tensor)."""

    terms: tuple[Term, ...]
    cols: bool = False
    out_rows: tuple[int, int] | None = None

    def describe(self) -> str:
        parts = " + ".join(f"{t.weight:g}*{'lora-T' if self.cols else 'lora'}({t.module}, s={t.scale:g})"
                           for t in self.terms)
        where = f"[rows {self.out_rows[0]}:{self.out_rows[1]}]" if self.out_rows is not None else ""
        return f"weighted{where}({parts})"

    def _concatenated(self, factor: Callable[[str], Tensor],
                      scaled: Callable[[Tensor, Term], Tensor]) -> tuple[Tensor, Tensor]:
        """(B_cat [out, R], A_cat [R, in]) as 2-D matrices; `scaled(A, term)` is A_i with its weight and scale."""
        a = torch.cat([scaled(factor(t.a).flatten(1), t) for t in self.terms], dim=0)
        b = torch.cat([factor(t.b).flatten(1) for t in self.terms], dim=1)
        return b, a

    def prepare(self, factors: Factors) -> Prepared:
        # as PEFT: `lora_A * weight * scaling`, left to right in float32
        b, a = self._concatenated(factors.factor, lambda a, t: a * t.weight * t.scale)
        return _Prepared(self, a, b.contiguous())

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None

        def make() -> tuple[Tensor, Tensor]:
            b, a = self._concatenated(ref.factor, lambda a, t: a * (t.weight * t.scale))
            return (a.T, b.T) if self.cols else (b, a)

        pair = ref.pair(self, make)
        if self.out_rows is None:
            return add_product(x, e, pair, r0, r1, 1.0, ref.ws, extra=_FACTOR_ROUNDINGS)
        o0, o1 = self.out_rows
        s0, s1 = max(r0, o0), min(r1, o1)
        if s0 < s1:
            add_product(x[s0 - r0:s1 - r0], e[s0 - r0:s1 - r0], pair, s0 - o0, s1 - o0, 1.0, ref.ws,
                        extra=_FACTOR_ROUNDINGS)
        return x, e


class _Prepared(Prepared):
    def __init__(self, op: WeightedLora, a: Tensor, b: Tensor) -> None:
        self.op, self.a, self.b = op, a, b

    def apply(self, w: Tensor, block: Block) -> None:
        op = self.op
        if op.cols:
            kernels.add_lora_cols(w, self.a[:, block.r0:block.r1], self.b, 1.0)
        elif op.out_rows is not None:
            kernels.add_lora_rows_at(w, block.r0, self.a, self.b, op.out_rows, 1.0)
        else:
            kernels.add_lora_rows(w, self.a, self.b[block.r0:block.r1], 1.0, block.scratch())
