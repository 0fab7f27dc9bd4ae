"""DoRA (spec §8): `W' = (m / ||W + dW||) * (W + dW)`, the norm per output channel: per row of a Linear/ConvNd
weight, per column (over every row) of a Conv1D or embedding weight. The LoRA delta itself is lora.py's."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import kernels
from ..bounds import dora
from ..errors import AdapterError
from .base import Block, Factors, ModuleKeys, Op, PlanContext, Prepared, Reference, Role

if TYPE_CHECKING:
    from ..plan.model import OutTensor

ROLES = (
    Role(".lora_magnitude_vector.weight", "magnitude"),
    Role(".lora_magnitude_vector", "magnitude"),
)
_PAIR_ROLES = {"A", "B", "emb_A", "emb_B"}


@dataclass(frozen=True)
class DoraRows(Op):
    """DoRA magnitude, norm per row of `W + dW` (Linear, ConvNd)."""

    key: str

    def describe(self) -> str:
        return "dora(rows)"

    def prepare(self, factors: Factors) -> Prepared:
        return _RowsPrepared(factors.factor(self.key).reshape(-1))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        m = ref.factor(self.key).reshape(-1)[r0:r1].reshape(-1, 1)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        e_norm = torch.linalg.vector_norm(e, dim=1, keepdim=True)
        return dora(x, e, m, norm, e_norm, ref.cols)


class _RowsPrepared(Prepared):
    def __init__(self, v: Tensor) -> None:
        self.v = v

    def apply(self, w: Tensor, block: Block) -> None:
        kernels.dora_rows(w, self.v[block.r0:block.r1])


@dataclass(frozen=True)
class DoraCols(Op):
    """DoRA magnitude, norm per column over all rows: needs a first pass over the whole tensor."""

    prepass = True

    key: str

    def describe(self) -> str:
        return "dora(cols, 2 passes)"

    def prepare(self, factors: Factors) -> Prepared:
        return _ColsPrepared(factors.factor(self.key).reshape(-1))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        norm, e_norm = ref.column_norms(self)
        m = ref.factor(self.key).reshape(1, -1)
        return dora(x, e, m, norm, e_norm, ref.rows)


class _ColsPrepared(Prepared):
    prepass = True

    def __init__(self, v: Tensor) -> None:
        self.v = v
        self.col_sq: Tensor | None = None
        self.col_norms: Tensor | None = None

    def partial(self, w: Tensor) -> Tensor:
        return kernels.column_sq_norms(w).double()

    def combine(self, part: Tensor) -> None:
        if self.col_sq is None:
            self.col_sq = torch.zeros_like(part)
        self.col_sq += part

    def settle(self) -> None:
        if self.col_sq is not None:
            self.col_norms = self.col_sq.sqrt().float()

    def apply(self, w: Tensor, block: Block) -> None:
        if self.col_norms is not None:
            kernels.dora_cols(w, self.v, self.col_norms)


def plan_magnitude(m: ModuleKeys, t: OutTensor, kind: str, ctx: PlanContext) -> None:
    """The magnitude op after the LoRA delta of module `m` on `t` ('rows' or 'cols', as the delta)."""
    key = m.roles["magnitude"]
    n = math.prod(ctx.adapter.shapes[key])
    expected = t.shape[1] if kind == "cols" else t.shape[0]
    if n != expected:
        ctx.problems.add(f"{m.name}: lora_magnitude_vector has {n} values, expected {expected} for {t.name} "
                         f"{list(t.shape)}")
    else:
        t.ops.append(DoraCols(key) if kind == "cols" else DoraRows(key))


def check_dora(roles: Mapping[str, Collection[str]], use_dora: bool, where: Path) -> None:
    """`use_dora` and the saved `lora_magnitude_vector`s agree for every LoRA module (`roles`: module -> roles).

    PEFT loads a mismatch without an error but merges something else than was trained: with use_dora=true and no
    magnitude it starts the magnitude from the base weight's norms; with use_dora=false it ignores saved ones.
    """
    pairs = sorted(n for n, r in roles.items() if set(r) & _PAIR_ROLES)
    with_magnitude = {n for n, r in roles.items() if "magnitude" in r}
    if use_dora:
        lacking = [n for n in pairs if n not in with_magnitude]
        if lacking:
            shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
            raise AdapterError(
                f"{where}: adapter_config.json sets use_dora=true but no lora_magnitude_vector is saved for "
                f"{len(lacking)} of {len(pairs)} LoRA module(s) ({shown}); without it the DoRA merge is undefined "
                "(PEFT would start the magnitude from the base weights, not the trained values): re-save the adapter "
                "with PEFT, or set use_dora=false if it was trained without DoRA"
            )
    elif with_magnitude:
        shown = ", ".join(sorted(with_magnitude)[:3])
        raise AdapterError(
            f"{where}: lora_magnitude_vector tensors are saved ({shown}...) but adapter_config.json says "
            "use_dora=false, so PEFT would ignore them; set use_dora=true if the adapter was trained with DoRA"
        )
