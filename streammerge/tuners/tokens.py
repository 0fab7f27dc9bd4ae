"""Trainable tokens (`trainable_token_indices`, spec §10.2): the saved rows are the new values of the listed
embedding rows (not deltas), cast to the base dtype first as PEFT does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..io.formats import DTYPES
from .base import Block, Factors, ModuleKeys, Op, PlanContext, Prepared, Reference, Role

ROLES = (Role(".token_adapter.trainable_tokens_delta", "tokens"),)


@dataclass(frozen=True)
class TokenRows(Op):
    """Trainable-token rows: new values for the listed rows (rounded to the base dtype first, as PEFT does)."""

    arithmetic = False

    key: str
    indices: tuple[int, ...]
    base_dtype: str

    def describe(self) -> str:
        return f"tokens({len(self.indices)} rows)"

    def prepare(self, factors: Factors) -> Prepared:
        values = factors.factor(self.key).to(DTYPES[self.base_dtype]).float()
        return _Prepared(torch.tensor(self.indices, dtype=torch.long), values)

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        values = ref.factor(self.key)
        base_dtype = DTYPES[self.base_dtype]
        last = {row: j for j, row in enumerate(self.indices)}  # a repeated index: the later row wins
        for row, j in last.items():
            if r0 <= row < r1:
                x[row - r0] = values[j].to(base_dtype).to(x.dtype)
                if e is not None:
                    e[row - r0] = 0.0
        return x, e


class _Prepared(Prepared):
    def __init__(self, indices: Tensor, values: Tensor) -> None:
        self.indices, self.values = indices, values

    def apply(self, w: Tensor, block: Block) -> None:
        sel = (self.indices >= block.r0) & (self.indices < block.r1)
        if bool(sel.any()):
            kernels.replace_rows(w, self.indices[sel] - block.r0, self.values[sel])


def plan_tokens(m: ModuleKeys, ctx: PlanContext) -> None:
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    indices = token_indices(ctx.config.trainable_token_indices, m.name)
    shape = ctx.adapter.shapes[m.roles["tokens"]]
    if indices is None:
        ctx.problems.add(f"{m.name}: trainable_tokens_delta saved but trainable_token_indices in "
                         "adapter_config.json does not name this module")
    elif len(shape) != 2 or shape[0] != len(indices) or shape[1] != t.shape[1]:
        ctx.problems.add(f"{m.name}: trainable_tokens_delta has shape {list(shape)}, expected "
                         f"[{len(indices)}, {t.shape[1]}]")
    elif max(indices) >= t.shape[0] or min(indices) < 0:
        ctx.problems.add(f"{m.name}: a trainable token index is outside the {t.shape[0]}-row embedding")
    else:
        base_dtype = t.base.dtype if t.base is not None else t.dtype
        t.ops.append(TokenRows(m.roles["tokens"], tuple(indices), base_dtype))


def token_indices(spec: Any, module: str) -> list[int] | None:
    """The indices `trainable_token_indices` gives `module` (a list applies to the input embedding)."""
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, value in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in value]
    return None
