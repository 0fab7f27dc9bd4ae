"""What a tuner (one PEFT adapter type) provides, and what planning, the engine and verify give it.

A tuner declares the key suffixes its adapter files use and the adapter_config.json fields it reads, plans each
adapter module onto the output tensors (shape checks, problems), and defines its operations. An operation is
planned data (adapter keys, scale) with three ways to run it:

* `prepare(factors)` loads its adapter tensors once (float32) and returns a `Prepared` whose `apply` changes a
  float32 row block of the weight in place: the merge's engine, built on `kernels.py`;
* `reference(ref, x, e, r0, r1)` evaluates the same formula in float64 on whole rows, with a bound on the float32
  error (`bounds.py`): what `verify` checks an output against, written apart from the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from ..adapter import Adapter, AdapterConfig
    from ..bounds import Pair, Workspace
    from ..io.safetensors import TensorInfo
    from ..layouts import FusedPart
    from ..plan.model import OutTensor


class Factors(Protocol):
    """Where prepared operations get adapter tensors: float32, checked for NaN/Inf (`Adapter.factor`)."""

    def factor(self, key: str) -> Tensor: ...


class Block:
    """One row block of the weight being merged: rows [r0, r1) of its 2-D view, and a scratch buffer shaped like
    the block (allocated once per tensor, on first use)."""

    __slots__ = ("_scratch", "r0", "r1")

    def __init__(self, r0: int, r1: int, scratch: Callable[[], Tensor]) -> None:
        self.r0, self.r1 = r0, r1
        self._scratch = scratch

    def scratch(self) -> Tensor:
        return self._scratch()


class Prepared:
    """An operation with its adapter tensors loaded, applied to one float32 row block after another.

    `apply` may run on several threads at once (one block each): it must not change the object. Operations with
    `prepass` need statistics over every row first (DoRA's column norms): `partial(w)` computes one block's share
    (on any thread), `combine` adds the shares in block order (so the sum does not depend on the thread count), and
    `settle` runs once after the last share, before the first `apply`.
    """

    prepass: bool = False

    def partial(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def combine(self, part: Tensor) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Called once after the prepass (and only for `prepass` operations)."""

    def apply(self, w: Tensor, block: Block) -> None:
        raise NotImplementedError


class Reference(Protocol):
    """What an operation's float64 reference formula gets from verify, for one output tensor."""

    rows: int
    cols: int
    per_index: int   # rows of the 2-D view that make one index of dim 0 (fused experts: d1)
    ws: Workspace

    def factor(self, key: str) -> Tensor: ...     # a whole adapter tensor as float64, read apart from the engine

    def pair(self, key: object, make: Callable[[], tuple[Tensor, Tensor]]) -> Pair: ...

    def column_norms(self, op: Op) -> tuple[Tensor, Tensor]: ...   # prepass ops: norms of the value before `op`


class Op:
    """A planned operation on one output tensor: adapter keys and numbers only (frozen dataclasses)."""

    # False: the operation writes saved values verbatim (trainable-token rows), so verify compares bit for bit
    arithmetic: ClassVar[bool] = True
    # verify views the tensor as [E*d1, d2] (one row per row of one expert's matrix) instead of [dim0, rest]
    expert_rows: ClassVar[bool] = False
    # the formula needs statistics over every row first (`Prepared.partial`, `Reference.column_norms`)
    prepass: ClassVar[bool] = False

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self, factors: Factors) -> Prepared:
        raise NotImplementedError

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class ProblemSink(Protocol):
    def add(self, text: str) -> None: ...


@dataclass
class ModuleKeys:
    """The adapter tensors saved for one module, by role (role -> adapter key)."""

    name: str
    roles: dict[str, str] = field(default_factory=dict)


@dataclass
class PlanContext:
    """What a tuner may use to plan a module: the adapter, the base's naming and tensors, and the output."""

    adapter: Adapter
    config: AdapterConfig
    model_type: str
    disk: Mapping[str, TensorInfo]
    to_disk: Callable[[str], str]
    target: Callable[[str], OutTensor | None]    # the output tensor for a module-side tensor name (None: reported)
    problems: ProblemSink
    loader: str = "auto"
    parts: Mapping[str, FusedPart] = field(default_factory=dict)


class Claim(Protocol):
    """Modules a tuner takes over before the layout is chosen (PEFT's ParamWrappers of target_parameters)."""

    @property
    def names(self) -> list[str]: ...   # module-side tensor names it will touch

    def plan(self, ctx: PlanContext) -> None: ...


@dataclass(frozen=True)
class Role:
    """An exact key suffix of an adapter file, the role of that tensor, and the module parameter it changes."""

    suffix: str
    role: str
    param: str | None = "weight"


@dataclass(frozen=True)
class Tuner:
    """One PEFT adapter type."""

    peft_type: str
    roles: tuple[Role, ...]
    config_fields: frozenset[str]            # adapter_config.json fields it reads or knowingly ignores
    plan_module: Callable[[ModuleKeys, PlanContext], None]
    alpha_field: str = "lora_alpha"
    shared_keys: tuple[str, ...] = ()        # model-level tensors (not per module), e.g. VeRA's projections
    refused_roles: Mapping[str, str] = field(default_factory=dict)   # role -> why it cannot be merged
    # modules taken out of per-module planning before the layout is chosen (LoRA's target_parameters)
    claim: Callable[[dict[str, ModuleKeys], Adapter, Mapping[str, TensorInfo], str, ProblemSink],
                    Sequence[Claim]] | None = None
    check_config: Callable[[Path, Mapping[str, Any]], None] | None = None
    check_keys: Callable[[dict[str, ModuleKeys], Adapter, ProblemSink], None] | None = None
    # a module transformers cuts out of a fused disk tensor (None: such modules are refused for this type)
    plan_part: Callable[[ModuleKeys, FusedPart, PlanContext], None] | None = None
    missing_shared_hint: str = ""

    @property
    def role_names(self) -> frozenset[str]:
        """The roles a module of this type may hold (refused ones are known, so they can be named, not merged)."""
        return frozenset(r.role for r in self.roles) - set(self.refused_roles)
