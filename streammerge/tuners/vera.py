"""VeRA (spec §13): `W += (lambda_b * B[:out]) @ (lambda_d * A[:, :in])` with the shared random projections
`vera_A`/`vera_B` saved once for the model (`save_projection=True`); transposed for Conv1D weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .. import kernels
from ..bounds import add_product
from ..errors import UnsupportedError
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
from .common import missing_roles, weight_view

# the shared random projections, saved once for the whole model
SHARED = ("base_model.vera_A", "base_model.vera_B")


@dataclass(frozen=True)
class VeraRows(Op):
    """VeRA: `W += (lambda_b * B[:out]) @ (lambda_d * A[:, :in])` (transposed for Conv1D)."""

    lambda_b: str
    lambda_d: str
    transpose: bool
    module: str

    def describe(self) -> str:
        return f"vera({self.module}{', T' if self.transpose else ''})"

    def prepare(self, factors: Factors) -> Prepared:
        a, b = factors.factor(SHARED[0]), factors.factor(SHARED[1])
        lambda_b, lambda_d = factors.factor(self.lambda_b), factors.factor(self.lambda_d)
        # exactly PEFT's factors: (lambda_b * B[:out]) and (lambda_d * A[:, :in]), rounded in float32
        return _Prepared(self.transpose, lambda_d.unsqueeze(-1) * a, lambda_b.unsqueeze(-1) * b[:lambda_b.shape[0]])

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None

        def factors() -> tuple[Tensor, Tensor]:
            a, b = ref.factor(SHARED[0]), ref.factor(SHARED[1])
            lb, ld = ref.factor(self.lambda_b).reshape(-1, 1), ref.factor(self.lambda_d).reshape(-1, 1)
            b_scaled, a_scaled = lb * b[: lb.shape[0]], ld * a
            if self.transpose:  # Conv1D [in, out]: rows are inputs
                return a_scaled[:, : ref.rows].T, b_scaled.T
            return b_scaled, a_scaled[:, : ref.cols]

        return add_product(x, e, ref.pair(self, factors), r0, r1, 1.0, ref.ws, extra=2)


class _Prepared(Prepared):
    def __init__(self, transpose: bool, a_full: Tensor, b: Tensor) -> None:
        self.transpose, self.a_full, self.b = transpose, a_full, b

    def apply(self, w: Tensor, block: Block) -> None:
        if self.transpose:  # Conv1D [in, out]: rows are inputs
            kernels.add_lora_cols(w, self.a_full[:, block.r0:block.r1], self.b, 1.0)
        else:
            kernels.add_lora_rows(w, self.a_full[:, : w.shape[1]], self.b[block.r0:block.r1], 1.0, block.scratch())


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None or missing_roles(m, ("vera_lambda_b", "vera_lambda_d"), "VERA", ctx):
        return
    w = t.shape
    _, _, conv1d = weight_view(w, m.name, ctx)
    shapes = ctx.adapter.shapes
    a_shape, b_shape = shapes[SHARED[0]], shapes[SHARED[1]]
    out_dim, in_dim = (w[1], w[0]) if conv1d else (w[0], w[1]) if len(w) == 2 else (-1, -1)
    lb, ld = shapes[m.roles["vera_lambda_b"]], shapes[m.roles["vera_lambda_d"]]
    ok = (len(w) == 2 and len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == b_shape[1] == ld[0]
          and lb == (out_dim,) and len(ld) == 1 and in_dim <= a_shape[1] and out_dim <= b_shape[0])
    if not ok:
        ctx.problems.add(f"{m.name}: vera_lambda_b {list(lb)} / vera_lambda_d {list(ld)} with vera_A {list(a_shape)} "
                         f"/ vera_B {list(b_shape)} do not fit {t.name} {list(w)}")
        return
    t.ops.append(VeraRows(m.roles["vera_lambda_b"], m.roles["vera_lambda_d"], conv1d, m.name))


def check_config(path: Path, raw: Mapping[str, Any]) -> None:
    if not raw.get("save_projection", True):
        raise UnsupportedError(
            f"{path}: a VeRA adapter saved with save_projection=false has no vera_A/vera_B (PEFT regenerates them "
            "from a PRNG key); re-save it with save_projection=True"
        )


ROLES = (Role(".vera_lambda_b", "vera_lambda_b"), Role(".vera_lambda_d", "vera_lambda_d"))

TUNER = Tuner(
    peft_type="VERA",
    roles=ROLES,
    config_fields=frozenset({"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                             "fan_in_fan_out", "bias"}),
    plan_module=plan_module,
    shared_keys=SHARED,
    missing_shared_hint="re-save it with save_projection=True",
    check_config=check_config,
)
