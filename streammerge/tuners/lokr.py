"""LoKr (spec §13): `W += kron(w1, w2) * alpha/r`, each factor saved whole or as a low-rank product."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import kernels
from ..bounds import add_elementwise
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


@dataclass(frozen=True)
class LokrRows(Op):
    """LoKr: `W += kron(w1, w2) * s`; w1/w2 are saved whole or as two factors each."""

    w1: tuple[str, ...]
    w2: tuple[str, ...]
    scale: float
    module: str

    def describe(self) -> str:
        return f"lokr({self.module}, s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        w1, w2 = ([factors.factor(k) for k in keys] for keys in (self.w1, self.w2))
        return _Prepared(self.scale, w1[0] if len(w1) == 1 else w1[0] @ w1[1], w2[0] if len(w2) == 1 else w2[0] @ w2[1])

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        import torch

        assert e is not None
        (w1, s1, n1), (w2, s2, n2) = _factor(ref, self.w1), _factor(ref, self.w2)
        m2 = w2.shape[0]
        i = torch.arange(r0, r1)
        d = (w1[i // m2].unsqueeze(2) * w2[i % m2].unsqueeze(1)).reshape(r1 - r0, -1)
        mag = (s1[i // m2].unsqueeze(2) * s2[i % m2].unsqueeze(1)).reshape(r1 - r0, -1)
        return add_elementwise(x, e, d, mag, self.scale, n1 + n2 + 4)


def _factor(ref: Reference, keys: tuple[str, ...]) -> tuple[Tensor, Tensor, int]:
    """(w, |a| @ |b| or |w|, inner length) of a LoKr factor saved whole or as a @ b."""
    parts = [ref.factor(k) for k in keys]
    if len(parts) == 1:
        return parts[0], parts[0].abs(), 0
    return parts[0] @ parts[1], parts[0].abs() @ parts[1].abs(), parts[0].shape[1]


class _Prepared(Prepared):
    def __init__(self, scale: float, w1: Tensor, w2: Tensor) -> None:
        self.scale, self.w1, self.w2 = scale, w1, w2

    def apply(self, w: Tensor, block: Block) -> None:
        kernels.add_kron_rows(w, self.w1, self.w2, block.r0, block.r1, self.scale)


def _factor_shape(shapes: list[tuple[int, ...]]) -> tuple[int, int] | None:
    """Shape of a LoKr factor saved whole ([m, n]) or as `a @ b` ([m, k] @ [k, n]); None for other forms."""
    if len(shapes) == 1 and len(shapes[0]) == 2:
        return shapes[0][0], shapes[0][1]
    if len(shapes) == 2 and all(len(x) == 2 for x in shapes) and shapes[0][1] == shapes[1][0]:
        return shapes[0][0], shapes[1][1]
    return None


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    roles = m.roles
    w1 = ("lokr_w1",) if "lokr_w1" in roles else ("lokr_w1_a", "lokr_w1_b")
    w2 = ("lokr_w2",) if "lokr_w2" in roles else ("lokr_w2_a", "lokr_w2_b")
    if missing_roles(m, (*w1, *w2), "LOKR", ctx):
        return
    rows, cols, conv1d = weight_view(t.shape, m.name, ctx)
    d1 = _factor_shape([ctx.adapter.shapes[roles[k]] for k in w1])
    d2 = _factor_shape([ctx.adapter.shapes[roles[k]] for k in w2])
    if d1 is None or d2 is None or conv1d or (d1[0] * d2[0], d1[1] * d2[1]) != (rows, cols):
        ctx.problems.add(f"{m.name}: LoKr factors {d1} x {d2} do not fit {t.name} {list(t.shape)}")
        return
    # PEFT scales by alpha/r with the configured r even when w1/w2 are saved whole (spec §13)
    scale = ctx.config.resolve_alpha(m.name) / ctx.config.resolve_r(m.name)
    t.ops.append(LokrRows(tuple(roles[k] for k in w1), tuple(roles[k] for k in w2), scale, m.name))


ROLES = (
    Role(".lokr_w1_a", "lokr_w1_a"), Role(".lokr_w1_b", "lokr_w1_b"), Role(".lokr_w2_a", "lokr_w2_a"),
    Role(".lokr_w2_b", "lokr_w2_b"), Role(".lokr_w1", "lokr_w1"), Role(".lokr_w2", "lokr_w2"),
    Role(".lokr_t2", "lokr_t2"),
)

TUNER = Tuner(
    peft_type="LOKR",
    roles=ROLES,
    config_fields=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights", "module_dropout",
                             "rank_dropout", "use_effective_conv2d", "decompose_both", "decompose_factor",
                             "rank_dropout_scale"}),
    plan_module=plan_module,
    alpha_field="alpha",
    refused_roles={"lokr_t2": "the CP-decomposed convolution form of LoKr (use_effective_conv2d)"},
)
