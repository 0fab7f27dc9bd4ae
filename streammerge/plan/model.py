"""The plan: every output tensor with its source and the operations that make it, decided before any byte is
written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from ..io.formats import ITEMSIZE

if TYPE_CHECKING:
    from ..io.quant import QuantRole, RequantReport
    from ..io.safetensors import TensorInfo
    from ..tuners.base import Op


@dataclass
class OutTensor:
    """One tensor of the output: where its rows come from and what is done to them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: TensorInfo | None                  # base tensor the rows come from (None: from the adapter)
    replacement: str | None = None           # adapter key whose values replace the base tensor
    ops: list[Op] = field(default_factory=list)
    quant: QuantRole | None = None           # rows from a quantized group (dequantized), or re-quantized into it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def raw_copy(self) -> bool:
        return (self.replacement is None and not self.ops and self.base is not None and self.base.dtype == self.dtype
                and self.quant is None)

    @property
    def merged(self) -> bool:
        return bool(self.ops) or self.replacement is not None

    def describe(self) -> str:
        parts = [f"replace({self.replacement})"] if self.replacement else []
        q = self.quant
        if q is not None and q.dequantizes and self.replacement is None:
            parts.append(q.tensor.describe())
        parts += [op.describe() for op in self.ops]
        if q is not None and q.requant is not None:
            parts.append(f"requantize({q.tensor.fmt.name})")
        if q is not None and q.scale_of is not None:
            parts.append(f"new scale of {q.scale_of}")
        if not parts:
            parts = ["copy" if self.raw_copy else f"cast {self.base.dtype if self.base else '?'}->{self.dtype}"]
        return " + ".join(parts)


@dataclass
class Plan:
    """The whole merge, in output order (the base's tensors, then the ones the merge adds)."""

    tensors: list[OutTensor]
    layout: str
    config_updates: dict[str, Any]
    notes: list[str]
    adapter_keys: int

    @property
    def merged(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.merged]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def requantized(self) -> list[RequantReport]:
        """The reports of the tensors `--dtype keep` re-quantizes (filled in as they are written)."""
        return [t.quant.report for t in self.tensors if t.quant is not None and t.quant.report is not None]

    @property
    def glued(self) -> frozenset[str]:
        """Tensors written together with the one before them (a re-quantized weight's new scale): same shard."""
        return frozenset(t.name for t in self.tensors if t.quant is not None and t.quant.scale_of is not None)


class Problems:
    """Every problem planning finds, raised once as one PlanError that lists them."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.hint = "the adapter was trained on another model, or for another size of it"

    def add(self, text: str) -> None:
        self.items.append(text)

    def raise_if_any(self, weights_path: Path, base_root: Path) -> None:
        if not self.items:
            return
        head = f"adapter {weights_path} does not fit base {base_root} ({len(self.items)} problem(s))"
        shown = self.items[:20]
        more = f"; ... and {len(self.items) - 20} more" if len(self.items) > 20 else ""
        raise PlanError(head + ": " + "; ".join(shown) + more + f". Likely cause: {self.hint}")
