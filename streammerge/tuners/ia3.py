"""IA3 (spec §13): multiplicative, `W *= l` per output row (and the bias), or per input column for the layers in
`feedforward_modules`; the vector is transposed for Conv1D weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .. import kernels
from ..bounds import scale_by
from .base import (
    Block,
    Factors,
    ModuleKeys,
    Op,
    PlanContext,
    Prepared,
    Reference,
    Role,
    Tuner,
)
from .common import weight_view


@dataclass(frozen=True)
class Ia3Scale(Op):
    """IA3: `W *= l` per row (`axis="rows"`, and the bias too) or per column (feed-forward layers)."""

    key: str
    axis: str

    def describe(self) -> str:
        return f"ia3({self.axis})"

    def prepare(self, factors: Factors) -> Prepared:
        return _Prepared(self.axis, factors.factor(self.key).reshape(-1))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        v = ref.factor(self.key).reshape(-1)
        v = v[r0:r1].reshape(-1, 1) if self.axis == "rows" else v.reshape(1, -1)
        return scale_by(x, e, v)


class _Prepared(Prepared):
    def __init__(self, axis: str, v: Tensor) -> None:
        self.axis, self.v = axis, v

    def apply(self, w: Tensor, block: Block) -> None:
        if self.axis == "rows":
            kernels.scale_rows(w, self.v[block.r0:block.r1])
        else:
            kernels.scale_cols(w, self.v)


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    key = m.roles["ia3_l"]
    shape, w = ctx.adapter.shapes[key], t.shape
    if len(shape) != 2 or len(w) != 2:
        ctx.problems.add(f"{m.name}: ia3_l {list(shape)} on {t.name} {list(w)}: only Linear and Conv1D are supported")
        return
    rows, cols, conv1d = weight_view(w, m.name, ctx)
    eff = (shape[1], shape[0]) if conv1d else shape  # PEFT transposes l for fan_in_fan_out layers
    feedforward = shape[0] == 1 and shape[1] != 1  # [1, in] scales inputs; [out, 1] outputs (and the bias)
    axis = "rows" if eff[1] == 1 and eff[0] == rows else "cols" if eff[0] == 1 and eff[1] == cols else ""
    if not axis:
        ctx.problems.add(f"{m.name}: ia3_l {list(shape)} does not fit {t.name} {list(w)}")
        return
    t.ops.append(Ia3Scale(key, axis))
    if not feedforward and ctx.to_disk(f"{m.name}.bias") in ctx.disk:
        bt = ctx.target(f"{m.name}.bias")
        if bt is not None and math.prod(bt.shape) == max(shape):
            bt.ops.append(Ia3Scale(key, "rows"))


ROLES = (Role(".ia3_l", "ia3_l"),)

TUNER = Tuner(
    peft_type="IA3",
    roles=ROLES,
    config_fields=frozenset({"feedforward_modules", "init_ia3_weights", "fan_in_fan_out"}),
    plan_module=plan_module,
)
