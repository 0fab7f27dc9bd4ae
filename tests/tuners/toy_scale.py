"""A toy adapter type, as a plug-in: `W[i, i] += alpha * c` for the square part of each targeted weight.

It is what docs/contributing.md walks through: one module that declares the type's key suffix and config field,
plans a module (shape checks, problems), and defines its operation for the engine (float32 row blocks) and for
verify (float64 reference with its float32 error bound). Registering it is the only other step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streammerge.bounds import gamma
from streammerge.tuners.base import Block, Factors, ModuleKeys, Op, PlanContext, Prepared, Reference, Role, Tuner


@dataclass(frozen=True)
class ScaleDiagonal(Op):
    """`W[i, i] += s * c` on the rows of the block (c: the module's saved scalar)."""

    key: str
    scale: float

    def describe(self) -> str:
        return f"diag(s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        return _Prepared(self.scale * factors.factor(self.key).reshape(()))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        c = ref.factor(self.key).reshape(())
        rows = torch.arange(r0, min(r1, ref.cols))
        d = self.scale * c
        e[rows - r0, rows] += gamma(2) * (x[rows - r0, rows].abs() + abs(d))
        x[rows - r0, rows] += d
        return x, e


class _Prepared(Prepared):
    def __init__(self, d: Tensor) -> None:
        self.d = d

    def apply(self, w: Tensor, block: Block) -> None:
        rows = torch.arange(block.r0, min(block.r1, w.shape[1]))
        w[rows - block.r0, rows] += self.d


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    shape = ctx.adapter.shapes[m.roles["c"]]
    if shape not in ((), (1,)) or len(t.shape) != 2:
        ctx.problems.add(f"{m.name}: scale_c {list(shape)} on {t.name} {list(t.shape)}: expected one value for a "
                         "2-D weight")
        return
    t.ops.append(ScaleDiagonal(m.roles["c"], ctx.config.resolve_alpha(m.name)))


TUNER = Tuner(
    peft_type="SCALE_DIAGONAL",
    roles=(Role(".scale_c", "c"),),
    config_fields=frozenset({"alpha", "alpha_pattern"}),
    plan_module=plan_module,
    alpha_field="alpha",
)
