"""The order of a pass: every output tensor of every output, grouped by the source tensor they read, so each
source row block is read once for all the outputs that need it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..io.sharding import header_bytes
from ..plan import OutTensor
from .rows import TensorRows

if TYPE_CHECKING:
    from ..adapter import Adapter
    from .stream import Output

FACTOR_BUDGET = 256 * 2**20   # float32 adapter factors held at once by the outputs sharing one source tensor


@dataclass
class Member:
    """One output tensor of one output, fed from a source block."""

    out: int
    t: OutTensor
    rows: TensorRows | None = None
    overflow: list[int] = field(default_factory=list)   # [count, first row] of float16 overflow


def pass_order(outputs: list[Output]) -> list[list[Member]]:
    """The pass: every output tensor of every output, grouped by the source tensor they read, in the first
    output's writing order (each output's tensors join the first group reading their source that lacks them)."""
    groups: list[list[Member]] = []
    open_groups: dict[tuple, list[int]] = {}
    for oi, out in enumerate(outputs):
        by_name = {t.name: t for t in out.plan.tensors}
        done = out.done()
        for shard in out.shards:
            for p in header_bytes(shard)[1]:
                if p.name in done:
                    continue
                t = by_name[p.name]
                shared = t.replacement is None and t.base is not None and tuple(t.base.shape) == tuple(t.shape)
                # a quantized group's logical tensor (read dequantized) and its packed weight (copied raw, by a job
                # that keeps an untouched group) share a name, not their bytes
                key: tuple = ("base", t.base.name, t.quant is not None) if shared else ("own", oi, t.name)  # type: ignore[union-attr]
                slot = next((g for g in open_groups.get(key, []) if all(m.out != oi for m in groups[g])), None)
                if slot is None:
                    slot = len(groups)
                    groups.append([])
                    open_groups.setdefault(key, []).append(slot)
                groups[slot].append(Member(oi, t))
    return groups


def waves(members: list[Member], outputs: list[Output]) -> list[list[Member]]:
    """Members split so that the adapter factors prepared at once stay within FACTOR_BUDGET (memory flat in the
    number of outputs); each wave reads the source again."""
    waves: list[list[Member]] = []
    size = 0
    for m in members:
        need = _factor_bytes(m.t, outputs[m.out].lora)
        if not waves or (size + need > FACTOR_BUDGET and waves[-1]):
            waves.append([])
            size = 0
        waves[-1].append(m)
        size += need
    return waves


def _factor_bytes(t: OutTensor, lora: Adapter) -> int:
    """float32 bytes of the adapter tensors `t`'s operations name (a fused factor counts whole)."""
    keys = {v for op in t.ops for v in vars(op).values() if isinstance(v, str)}
    return sum(math.prod(lora.shapes[k]) * 4 for k in keys if k in lora.shapes)
