"""Small planning helpers several tuners share."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..layouts import conv1d_layer
from .base import ModuleKeys, PlanContext


def missing_roles(m: ModuleKeys, roles: Iterable[str], kind: str, ctx: PlanContext) -> bool:
    """Report the roles of `roles` module `m` lacks; True when any is missing."""
    lack = [r for r in roles if r not in m.roles]
    if lack:
        ctx.problems.add(f"{m.name}: {kind} tensors {lack} are missing; the adapter file is incomplete")
    return bool(lack)


def weight_view(shape: tuple[int, ...], module: str, ctx: PlanContext) -> tuple[int, int, bool]:
    """(rows, cols) of the weight viewed 2-D, and whether it is a transformers Conv1D weight ([in, out])."""
    rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    return rows, cols, len(shape) == 2 and conv1d_layer(ctx.model_type, module)
