"""LoHa (spec §13): `W += ((w1a @ w1b) * (w2a @ w2b)) * alpha/r`, the Hadamard product of two low-rank products."""

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

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CP = "the CP-decomposed convolution form of LoHa (use_effective_conv2d)"


@dataclass(frozen=True)
class LohaRows(Op):
    """LoHa: `W += ((w1a @ w1b) * (w2a @ w2b)) * s`, row block by row block."""

    w1a: str
    w1b: str
    w2a: str
    w2b: str
    scale: float
    module: str

    def describe(self) -> str:
        return f"loha({self.module}, s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        return _Prepared(self.scale, *(factors.factor(k) for k in (self.w1a, self.w1b, self.w2a, self.w2b)))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        f = ref.factor
        w1a, w1b, w2a, w2b = f(self.w1a)[r0:r1], f(self.w1b), f(self.w2a)[r0:r1], f(self.w2b)
        d = (w1a @ w1b) * (w2a @ w2b)
        mag = (w1a.abs() @ w1b.abs()) * (w2a.abs() @ w2b.abs())
        return add_elementwise(x, e, d, mag, self.scale, 2 * w1b.shape[0] + 4)


class _Prepared(Prepared):
    def __init__(self, scale: float, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> None:
        self.scale, self.w1a, self.w1b, self.w2a, self.w2b = scale, w1a, w1b, w2a, w2b

    def apply(self, w: Tensor, block: Block) -> None:
        r0, r1 = block.r0, block.r1
        kernels.add_hadamard_rows(w, self.w1a[r0:r1], self.w1b, self.w2a[r0:r1], self.w2b, self.scale)


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None or missing_roles(m, _FACTORS, "LOHA", ctx):
        return
    rows, cols, conv1d = weight_view(t.shape, m.name, ctx)
    s1a, s1b, s2a, s2b = (ctx.adapter.shapes[m.roles[k]] for k in _FACTORS)
    r = s1b[0] if len(s1b) == 2 else -1
    if not (len(s1a) == len(s2a) == 2 and s1a == s2a and s1b == s2b and s1a == (rows, r)
            and s1b[1] == cols) or conv1d:
        ctx.problems.add(f"{m.name}: hada_w1_a {list(s1a)} / hada_w1_b {list(s1b)} do not fit {t.name} "
                         f"{list(t.shape)}")
        return
    if r != ctx.config.resolve_r(m.name):
        ctx.problems.add(f"{m.name}: LoHa rank {r} but adapter_config.json says r={ctx.config.resolve_r(m.name)}")
        return
    scale = ctx.config.resolve_alpha(m.name) / r
    w1a, w1b, w2a, w2b = (m.roles[k] for k in _FACTORS)
    t.ops.append(LohaRows(w1a, w1b, w2a, w2b, scale, m.name))


ROLES = (
    Role(".hada_w1_a", "hada_w1_a"), Role(".hada_w1_b", "hada_w1_b"), Role(".hada_w2_a", "hada_w2_a"),
    Role(".hada_w2_b", "hada_w2_b"), Role(".hada_t1", "hada_t1"), Role(".hada_t2", "hada_t2"),
)

TUNER = Tuner(
    peft_type="LOHA",
    roles=ROLES,
    config_fields=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern", "init_weights", "module_dropout",
                             "rank_dropout", "use_effective_conv2d"}),
    plan_module=plan_module,
    alpha_field="alpha",
    refused_roles={"hada_t1": _CP, "hada_t2": _CP},
)
