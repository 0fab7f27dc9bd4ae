"""LoRA on `nn.Parameter`s (`target_parameters`, spec §12): fused MoE experts and 2-D parameters such as a router.

The fused factors are `A [r*E, in]` (rows grouped by expert) and `B [out, r*E]` (columns interleaved by expert):
`dW[e] = s * B[:, e::E] @ A[e*r:(e+1)*r]`. Checkpoints store the experts fused (`[E, d1, d2]`, merged here one
expert per row of the `[E, d1*d2]` view) or one 2-D tensor per expert and projection (planned as `LoraRows` on
slices of the factors, lora.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import permutations
from typing import TYPE_CHECKING

from torch import Tensor

from .. import kernels
from ..bounds import add_product
from ..errors import UnsupportedError
from ..layouts import PER_EXPERT, REGISTRATION_ORDER, TRANSPOSED_EXPERTS, candidates
from .base import (
    Block,
    Factors,
    ModuleKeys,
    Op,
    PlanContext,
    Prepared,
    ProblemSink,
    Reference,
)

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..io.safetensors import TensorInfo

# more nested wrappers than this on one module is not a real adapter; it bounds the search over assignments
MAX_NESTED = 6


@dataclass(frozen=True)
class LoraExperts(Op):
    """Fused expert parameter stored fused on disk, `[E, d1, d2]`: `W[e] += s * B_e @ A_e` (or its transpose
    when the disk layout is `[E, in, out]`), one expert per row of the `[E, d1*d2]` view."""

    expert_rows = True

    a: str
    b: str
    scale: float
    module: str
    experts: int
    transpose: bool

    def describe(self) -> str:
        return f"lora-experts({self.module}, E={self.experts}{', T' if self.transpose else ''}, s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        return _Prepared(self, factors.factor(self.a), factors.factor(self.b))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        a, b = ref.factor(self.a), ref.factor(self.b)
        r = a.shape[0] // self.experts
        d1 = ref.per_index
        row = r0
        while row < r1:  # the rows of one expert at a time
            ex = row // d1
            stop = min(r1, (ex + 1) * d1)
            a_e, b_e = a[ex * r:(ex + 1) * r], b[:, ex::self.experts]
            # stored [in, out]: row i of (B_e @ A_e)^T
            left, right = (a_e.T, b_e.T) if self.transpose else (b_e, a_e)
            pair = ref.pair((self, ex), _given(left, right))
            add_product(x[row - r0:stop - r0], e[row - r0:stop - r0], pair, row - ex * d1, stop - ex * d1,
                        self.scale, ref.ws)
            row = stop
        return x, e


def _given(left: Tensor, right: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    return lambda: (left, right)


class _Prepared(Prepared):
    def __init__(self, op: LoraExperts, a: Tensor, b: Tensor) -> None:
        self.op, self.a, self.b = op, a, b

    def apply(self, w: Tensor, block: Block) -> None:
        op = self.op
        r = self.a.shape[0] // op.experts
        for e in range(block.r0, block.r1):
            kernels.add_expert_delta(w[e - block.r0], self.a[e * r:(e + 1) * r], self.b[:, e::op.experts], op.scale,
                                     op.transpose)


# ---------------------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class ParamOnDisk:
    """A module parameter as PEFT sees it (`shape`), and the module-side tensor names that hold it on disk."""

    family: str                     # "fused" (one tensor) | "per-expert" (one 2-D tensor per expert and part)
    shape: tuple[int, ...]          # [E, d1, d2] or [d1, d2]
    names: tuple[str, ...]
    parts: tuple[str, ...] = ()     # per-expert tensor names inside each expert (w1, w3 / gate_proj, up_proj)


Finder = Callable[[str, str], "ParamOnDisk | None"]


def param_finder(disk: Mapping[str, TensorInfo], loader: str) -> Finder:
    """`find(module, param)`: where the parameter `<module>.<param>` lives on disk, or None if the base has none."""
    layouts = candidates(loader)
    cache: dict[tuple[str, str], ParamOnDisk | None] = {}

    def locate(name: str):
        for lay in layouts:
            if lay.to_disk(name) in disk:
                return lay
        return None

    def find(module: str, param: str) -> ParamOnDisk | None:
        if (module, param) not in cache:
            cache[(module, param)] = _find(module, param)
        return cache[(module, param)]

    def _find(module: str, param: str) -> ParamOnDisk | None:
        fused = f"{module}.{param}"
        lay = locate(fused)
        if lay is not None:
            return ParamOnDisk("fused", disk[lay.to_disk(fused)].shape, (fused,))
        for parts in PER_EXPERT.get(param, ()):
            lay = locate(f"{module}.0.{parts[0]}.weight")
            if lay is None:
                continue
            experts = 0
            while lay.to_disk(f"{module}.{experts}.{parts[0]}.weight") in disk:
                experts += 1
            names = tuple(f"{module}.{e}.{p}.weight" for e in range(experts) for p in parts)
            first = [disk.get(lay.to_disk(f"{module}.0.{p}.weight")) for p in parts]
            if all(i is not None and len(i.shape) == 2 for i in first):
                rows = sum(i.shape[0] for i in first if i is not None)
                return ParamOnDisk("per-expert", (experts, rows, first[0].shape[1]), names, parts)  # type: ignore[union-attr]
            # a broken checkpoint: its tensors are reported missing or mis-shaped per expert
            return ParamOnDisk("per-expert", (experts, -1, -1), names, parts)
        return None

    return find


@dataclass
class FusedParam:
    """One ParamWrapper's LoRA pair and the parameter it belongs to."""

    module: str                      # e.g. model.layers.0.mlp.experts
    param: str                       # gate_up_proj / down_proj / weight / any other parameter name
    a: str
    b: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    r: int
    scale: float
    experts: int
    disk: ParamOnDisk

    @property
    def names(self) -> list[str]:
        return list(self.disk.names)

    def plan(self, ctx: PlanContext) -> None:
        where = f"{self.module}.{self.param}"
        if self.disk.family == "fused":
            self._plan_fused(where, ctx)
        else:
            self._plan_per_expert(where, ctx)

    def _plan_fused(self, where: str, ctx: PlanContext) -> None:
        from .lora import LoraRows

        E, problems = self.experts, ctx.problems
        in_dim, out_dim = self.a_shape[1], self.b_shape[0]
        t = ctx.target(self.names[0])
        if t is None:
            return
        if len(t.shape) == 2 and E == 1:
            # a 2-D parameter (e.g. a router's gate.weight): PEFT's ParamWrapper is plain Linear LoRA on it
            if t.shape != (out_dim, in_dim):
                problems.add(f"{where}: lora_A {list(self.a_shape)} / lora_B {list(self.b_shape)} do not fit "
                             f"{t.name} {list(t.shape)}")
                return
            t.ops.append(LoraRows(self.a, self.b, self.scale, where))
            return
        if len(t.shape) != 3 or t.shape[0] != E:
            problems.add(f"{where}: LoRA factors for {E} experts do not fit {t.name} {list(t.shape)}")
            return
        d1, d2 = t.shape[1:]
        if (out_dim, in_dim) == (d1, d2) and (in_dim, out_dim) == (d1, d2):
            transpose = ctx.model_type in TRANSPOSED_EXPERTS  # square: only the architecture can tell
        elif (out_dim, in_dim) == (d1, d2):
            transpose = False
        elif (in_dim, out_dim) == (d1, d2):
            transpose = True
        else:
            problems.add(f"{where}: lora_A {list(self.a_shape)} / lora_B {list(self.b_shape)} do not fit "
                         f"{t.name} {list(t.shape)}")
            return
        t.ops.append(LoraExperts(self.a, self.b, self.scale, where, E, transpose))

    def _plan_per_expert(self, where: str, ctx: PlanContext) -> None:
        from .lora import LoraRows

        E, problems, parts = self.experts, ctx.problems, self.disk.parts
        in_dim, out_dim = self.a_shape[1], self.b_shape[0]
        rows = out_dim // len(parts)
        if rows * len(parts) != out_dim:
            problems.add(f"{where}: lora_B has {out_dim} rows, not divisible into {', '.join(parts)}")
            return
        if self.disk.shape[0] != E:
            problems.add(f"{where}: LoRA factors for {E} experts, the base has {self.disk.shape[0]} "
                         f"({self.module}.N.{parts[0]}.weight)")
            return
        for e in range(E):
            for i, part in enumerate(parts):
                t = ctx.target(f"{self.module}.{e}.{part}.weight")
                if t is None:
                    continue
                if t.shape != (rows, in_dim):
                    problems.add(f"{where}: expert {e} {part} is {list(t.shape)} on disk, the LoRA delta gives "
                                 f"{[rows, in_dim]}")
                    continue
                t.ops.append(LoraRows(self.a, self.b, self.scale, where, expert=e, experts=E,
                                      b_rows=(i * rows, (i + 1) * rows)))


def claim(modules: dict[str, ModuleKeys], adapter: Adapter, disk: Mapping[str, TensorInfo], loader: str,
          problems: ProblemSink) -> list[FusedParam]:
    """Take the LoRA pairs of PEFT's ParamWrappers (target_parameters) out of `modules`.

    A module is a ParamWrapper when target_parameters selects one of its parameters that exists in the base; its
    nested wrappers (`.base_layer` repeated) belong to its other selected parameters (spec §12).
    """
    cfg = adapter.config
    if not cfg.target_parameters:
        return []
    find = param_finder(disk, loader)
    roots: dict[str, list[tuple[int, ModuleKeys]]] = defaultdict(list)
    for name in list(modules):
        root, depth = name, 0
        while root.endswith(".base_layer"):
            root, depth = root[: -len(".base_layer")], depth + 1
        if targeted_params(root, cfg.target_parameters, find):
            roots[root].append((depth, modules.pop(name)))
        elif depth:
            m = modules.pop(name)
            problems.add(f"{name}: nested LoRA pair ({', '.join(sorted(m.roles.values()))}) for target_parameters, "
                         f"but no parameter of {root} that target_parameters {list(cfg.target_parameters)} names "
                         "exists in the base")
    fused = []
    for root, wrapped in roots.items():
        params = targeted_params(root, cfg.target_parameters, find)
        pairs: dict[int, ModuleKeys] = {}
        for depth, m in wrapped:
            if set(m.roles) != {"A", "B"}:
                extra = sorted(set(m.roles) - {"A", "B"})
                problems.add(f"{m.name}: target_parameters supports lora_A/lora_B only, found {extra or 'a half pair'}")
                continue
            pairs[depth] = m
        if len(pairs) != len(wrapped):
            continue
        if sorted(pairs) != list(range(len(params))):
            problems.add(f"{root}: LoRA pairs at nesting depth(s) {sorted(pairs)} but target_parameters selects "
                         f"{len(params)} parameter(s) of it ({', '.join(params)}); PEFT nests one wrapper per "
                         "parameter, so the adapter file is incomplete or for another model")
            continue
        order = _registration_order(root, pairs, params, adapter, problems)
        if order is None:
            continue
        n = len(order)
        for depth, m in sorted(pairs.items()):
            param = order[n - 1 - depth]
            name = f"{root}.{param}"
            a_shape, b_shape = adapter.shapes[m.roles["A"]], adapter.shapes[m.roles["B"]]
            r = cfg.resolve_r(name)
            fused.append(FusedParam(root, param, m.roles["A"], m.roles["B"], a_shape, b_shape, r,
                                    cfg.scaling(name, r), a_shape[0] // r, params[param]))
    return fused


def _registration_order(root: str, pairs: dict[int, ModuleKeys], params: dict[str, ParamOnDisk], adapter: Adapter,
                        problems: ProblemSink) -> tuple[str, ...] | None:
    """The order PEFT wrapped `params` in (innermost first), from the shapes of the nested LoRA pairs.

    Checkpoints do not record the registration order (safetensors stores names sorted), so the LoRA shapes decide
    which pair belongs to which parameter; only when several assignments fit does transformers' own order
    (`layouts.REGISTRATION_ORDER`) decide.
    """
    cfg = adapter.config

    def shapes(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = pairs[depth]
        return adapter.shapes[m.roles["A"]], adapter.shapes[m.roles["B"]]

    def fits(depth: int, param: str) -> bool:
        (a, b), on_disk = shapes(depth), params[param]
        r = cfg.resolve_r(f"{root}.{param}")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or r <= 0 or a[0] % r:
            return False
        experts, io, w = a[0] // r, (b[0], a[1]), on_disk.shape
        if len(w) == 2:
            return experts == 1 and io == w
        transposed_ok = on_disk.family == "fused"  # [E, in, out] exists only fused on disk (GPT-OSS, qwen3_vl_moe)
        return len(w) == 3 and w[0] == experts and (io == w[1:] or (transposed_ok and io[::-1] == w[1:]))

    n = len(params)
    if n > MAX_NESTED:
        problems.add(f"{root}: target_parameters selects {n} parameters of one module; at most {MAX_NESTED} are "
                     "supported")
        return None
    fitting = [order for order in permutations(params) if all(fits(d, order[n - 1 - d]) for d in pairs)]
    if len(fitting) == 1:
        return fitting[0]
    described = "; ".join(f"{pairs[d].roles['A']} {list(shapes(d)[0])} / lora_B {list(shapes(d)[1])}"
                          for d in sorted(pairs))
    disk = ", ".join(f"{p} {list(params[p].shape)}" for p in params)
    if not fitting:
        problems.add(f"{root}: the LoRA pairs ({described}) do not fit its parameters ({disk}) with the ranks of "
                     "adapter_config.json (r / rank_pattern)")
        return None
    known = tuple(p for p in REGISTRATION_ORDER if p in params)
    if len(known) == n and known in fitting:
        return known
    raise UnsupportedError(
        f"{adapter.weights_path}: {root}: the nested LoRA pairs ({described}) fit its parameters ({disk}) in more "
        "than one order, and the order PEFT wrapped them in (the module's parameter registration order) is not "
        "known for these parameter names; merge this adapter with PEFT's merge_and_unload instead"
    )


def targeted_params(module: str, targets: tuple[str, ...], find: Finder) -> dict[str, ParamOnDisk]:
    """Parameters of `module` that target_parameters selects, as PEFT matches them: `<module>.<param>` equals a
    target or ends with `.<target>`, and the parameter exists. A bare name (`down_proj`) therefore selects only
    modules that own such a parameter, never a LoRA module whose name merely precedes it."""
    found: dict[str, ParamOnDisk] = {}
    for t in targets:
        param = t.rsplit(".", 1)[-1]
        full = f"{module}.{param}"
        if param in found or not (full == t or full.endswith("." + t)):
            continue
        on_disk = find(module, param)
        if on_disk is not None:
            found[param] = on_disk
    return found
