"""LoRA (spec §1-§7, §9): `W += s * B @ A` on Linear/ConvNd rows, `(B @ A)^T` on Conv1D and embeddings, and
`lora_B.bias` onto the bias. DoRA magnitudes, trainable tokens and target_parameters (fused experts) are LoRA
adapters too; their operations live in dora.py, tokens.py and experts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .. import kernels
from ..bounds import add_elementwise, add_product
from ..errors import UnsupportedError
from ..io.formats import FLOAT_DTYPES
from ..layouts import conv1d_layer
from . import dora, experts, tokens
from .base import (
    Block,
    Factors,
    ModuleKeys,
    Op,
    PlanContext,
    Prepared,
    ProblemSink,
    Reference,
    Role,
    Tuner,
)

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..layouts import FusedPart


@dataclass(frozen=True)
class LoraRows(Op):
    """`W[r0:r1] += B[r0:r1] @ A * s` on the weight viewed as `[out, in]` (Linear, ConvNd).

    For one expert of fused MoE factors (target_parameters, spec §12) the factors are slices:
    `A_e = A[e*r:(e+1)*r]`, `B_e = B[:, e::E]`, and `b_rows` picks the rows of `B_e @ A_e` this tensor holds
    (w1 = gate rows, w3 = up rows of a fused gate_up_proj).
    """

    a: str
    b: str
    scale: float
    module: str
    expert: int | None = None
    experts: int = 1
    b_rows: tuple[int, int] | None = None
    out_rows: tuple[int, int] | None = None  # the delta covers only these rows of W (a module cut out of a fused W)

    def describe(self) -> str:
        where = f"[expert {self.expert}]" if self.expert is not None else ""
        if self.out_rows is not None:
            where += f"[rows {self.out_rows[0]}:{self.out_rows[1]}]"
        return f"lora({self.module}{where}, s={self.scale:g})"

    def _factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(B, A) of this tensor's delta as 2-D matrices, from the saved factors."""
        if self.expert is not None:
            # one expert of fused factors: A rows grouped by expert, B columns interleaved (spec §12)
            r = a.shape[0] // self.experts
            a = a[self.expert * r:(self.expert + 1) * r]
            b = b[:, self.expert::self.experts]
        if self.b_rows is not None:
            b = b[self.b_rows[0]:self.b_rows[1]]
        return b.flatten(1), a.flatten(1)  # flatten, not reshape(n, -1): a factor with 0 rows is fine

    def prepare(self, factors: Factors) -> Prepared:
        b, a = self._factors(factors.factor(self.a), factors.factor(self.b))
        return _RowsPrepared(self, a, b.contiguous())

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        pair = ref.pair(self, lambda: self._factors(ref.factor(self.a), ref.factor(self.b)))
        if self.out_rows is None:
            return add_product(x, e, pair, r0, r1, self.scale, ref.ws)
        o0, o1 = self.out_rows
        s0, s1 = max(r0, o0), min(r1, o1)
        if s0 < s1:
            add_product(x[s0 - r0:s1 - r0], e[s0 - r0:s1 - r0], pair, s0 - o0, s1 - o0, self.scale, ref.ws)
        return x, e


class _RowsPrepared(Prepared):
    def __init__(self, op: LoraRows, a: Tensor, b: Tensor) -> None:
        self.op, self.a, self.b = op, a, b

    def apply(self, w: Tensor, block: Block) -> None:
        op = self.op
        if op.out_rows is not None:
            kernels.add_lora_rows_at(w, block.r0, self.a, self.b, op.out_rows, op.scale)
        else:
            kernels.add_lora_rows(w, self.a, self.b[block.r0:block.r1], op.scale, block.scratch())


@dataclass(frozen=True)
class LoraCols(Op):
    """`W[r0:r1] += (A[:, r0:r1].T @ B.T) * s`: Conv1D `[in, out]` and embedding `[vocab, dim]` weights."""

    a: str
    b: str
    scale: float
    module: str

    def describe(self) -> str:
        return f"lora-T({self.module}, s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        return _ColsPrepared(self, factors.factor(self.a), factors.factor(self.b))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        pair = ref.pair(self, lambda: (ref.factor(self.a).T, ref.factor(self.b).T))
        return add_product(x, e, pair, r0, r1, self.scale, ref.ws)


class _ColsPrepared(Prepared):
    def __init__(self, op: LoraCols, a: Tensor, b: Tensor) -> None:
        self.op, self.a, self.b = op, a, b

    def apply(self, w: Tensor, block: Block) -> None:
        kernels.add_lora_cols(w, self.a[:, block.r0:block.r1], self.b, self.op.scale)


@dataclass(frozen=True)
class BiasAdd(Op):
    """`b += s * lora_B.bias` (lora_bias, spec §9)."""

    key: str
    scale: float

    def describe(self) -> str:
        return f"lora_bias(s={self.scale:g})"

    def prepare(self, factors: Factors) -> Prepared:
        return _BiasPrepared(self.scale, factors.factor(self.key).reshape(-1))

    def reference(self, ref: Reference, x: Tensor, e: Tensor | None, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        assert e is not None
        v = ref.factor(self.key).reshape(-1, 1)[r0:r1]
        return add_elementwise(x, e, v, v.abs(), self.scale, 3)


class _BiasPrepared(Prepared):
    def __init__(self, scale: float, v: Tensor) -> None:
        self.scale, self.v = scale, v

    def apply(self, w: Tensor, block: Block) -> None:
        kernels.add_scaled(w, self.v[block.r0:block.r1].reshape(-1, 1), self.scale)


# ---------------------------------------------------------------------------------------------------------
# planning

_PAIR_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}


def plan_module(m: ModuleKeys, ctx: PlanContext) -> None:
    """Trainable tokens, the LoRA pair (Linear/ConvNd/Conv1D/embedding), its DoRA magnitude and lora_bias."""
    roles, problems = m.roles, ctx.problems
    if "tokens" in roles:
        tokens.plan_tokens(m, ctx)
    pair = (("A", "B") if {"A", "B"} & roles.keys() else
            ("emb_A", "emb_B") if {"emb_A", "emb_B"} & roles.keys() else None)
    if pair is None:
        for role in ("magnitude", "lora_bias"):
            if role in roles:
                problems.add(f"{m.name}: {roles[role]} has no lora_A/lora_B pair; the adapter file is incomplete")
        return
    a_role, b_role = pair
    if a_role not in roles or b_role not in roles:
        have, lack = (a_role, b_role) if a_role in roles else (b_role, a_role)
        problems.add(f"{m.name}: {roles[have]} is saved without its {_PAIR_NAMES[lack]}; the adapter file is "
                     "incomplete")
        return
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    if t.base is not None and t.base.dtype not in FLOAT_DTYPES and t.replacement is None:
        problems.add(f"{m.name}: base tensor {t.name} is {t.base.dtype}, not a float weight; is the base quantized?")
        return
    a_key, b_key = roles[a_role], roles[b_role]
    a_shape, b_shape = ctx.adapter.shapes[a_key], ctx.adapter.shapes[b_key]
    r = a_shape[0] if a_shape else 0
    if a_role == "emb_A":
        if not (len(a_shape) == 2 and len(b_shape) == 2 and b_shape[1] == r and t.shape == (a_shape[1], b_shape[0])):
            problems.add(f"{m.name}: lora_embedding_A {list(a_shape)} / lora_embedding_B {list(b_shape)} do not fit "
                         f"embedding {t.name} {list(t.shape)}")
            return
        kind = "cols"
    else:
        found = linear_kind(m.name, a_shape, b_shape, t.shape, ctx.model_type, ctx.config.fan_in_fan_out)
        if found is None:
            problems.add(f"{m.name}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit base {t.name} "
                         f"{list(t.shape)}")
            return
        if found == "grouped":
            raise UnsupportedError(f"{ctx.adapter.weights_path}: {m.name} is a grouped convolution (groups > 1); PEFT "
                                   "cannot merge LoRA into it either")
        kind = found
    if not _rank_agrees(m.name, r, ctx):
        return
    scale = ctx.config.scaling(m.name, r)
    t.ops.append(LoraCols(a_key, b_key, scale, m.name) if kind == "cols" else LoraRows(a_key, b_key, scale, m.name))
    if "magnitude" in roles:
        dora.plan_magnitude(m, t, kind, ctx)
    if "lora_bias" in roles:
        _plan_bias(m, scale, ctx)


def _rank_agrees(name: str, r: int, ctx: PlanContext) -> bool:
    expected = ctx.config.resolve_r(name)
    if r != expected:
        ctx.problems.add(f"{name}: lora_A has rank {r} but adapter_config.json says r={expected} for it "
                         "(r / rank_pattern); the config and weights disagree")
    return r == expected


def _plan_bias(m: ModuleKeys, scale: float, ctx: PlanContext) -> None:
    bkey = m.roles["lora_bias"]
    bt = ctx.target(f"{m.name}.bias")
    if bt is None:
        return
    if ctx.adapter.shapes[bkey] != bt.shape:
        ctx.problems.add(f"{m.name}: lora_B.bias {list(ctx.adapter.shapes[bkey])} does not fit {bt.name} "
                         f"{list(bt.shape)}")
    else:
        bt.ops.append(BiasAdd(bkey, scale))


def plan_part(m: ModuleKeys, part: FusedPart, ctx: PlanContext) -> None:
    """LoRA on a module transformers cuts out of a fused disk tensor: its delta lands on the module's rows."""
    roles, adapter = m.roles, ctx.adapter
    extra = sorted(set(roles) - {"A", "B"})
    if part.rows is None or extra:
        why = ("its rows of the fused tensor cannot be told" if part.rows is None else
               f"only a plain lora_A/lora_B pair can be merged into its rows, this adapter also has {extra}")
        raise UnsupportedError(f"{adapter.weights_path}: {m.name} is cut out of the fused checkpoint tensor "
                               f"{part.disk} on load ({part.how}); {why}: not supported, merge it with PEFT instead")
    if set(roles) != {"A", "B"}:
        have = next(iter(roles.values()))
        ctx.problems.add(f"{m.name}: {have} is saved without the other half of its LoRA pair; the adapter file is "
                         "incomplete")
        return
    t = ctx.target(f"{m.name}.weight")
    if t is None:
        return
    r0, r1 = part.rows
    a_shape, b_shape = adapter.shapes[roles["A"]], adapter.shapes[roles["B"]]
    rows = (r1 - r0, *t.shape[1:])
    if len(t.shape) != 2 or linear_kind(m.name, a_shape, b_shape, rows, "", False) != "rows":
        ctx.problems.add(f"{m.name}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit rows {r0}..{r1 - 1} "
                         f"of {t.name} {list(t.shape)}")
        return
    r = a_shape[0]
    if _rank_agrees(m.name, r, ctx):
        t.ops.append(LoraRows(roles["A"], roles["B"], ctx.config.scaling(m.name, r), m.name, out_rows=(r0, r1)))


def linear_kind(name: str, a: tuple[int, ...], b: tuple[int, ...], w: tuple[int, ...], model_type: str,
                fan_in_fan_out: bool) -> str | None:
    """'rows' for [out, in] weights, 'cols' for Conv1D [in, out], 'grouped' for grouped convs, None if no fit."""
    if len(a) < 2 or len(b) < 2 or (b[1] != a[0] and len(w) <= 2):
        return None
    r = a[0]
    if len(w) > 2:  # ConvNd: A [r, in, *k], B [out, r/groups, 1...]
        if b[0] != w[0] or len(b) != len(w) or any(d != 1 for d in b[2:]) or a[2:] != w[2:]:
            return None
        if b[1] != r:  # lora_B carries the base's groups: r/groups input channels
            return "grouped"
        return "rows" if a[1:] == w[1:] else None
    if b[1] != r or len(w) != 2:
        return None
    out_dim, in_dim = b[0], a[1]
    linear = w == (out_dim, in_dim)
    conv1d = w == (in_dim, out_dim)
    if linear and conv1d:  # square: only the architecture can tell
        is_conv1d = conv1d_layer(model_type, name) if model_type else fan_in_fan_out
        return "cols" if is_conv1d else "rows"
    if linear:
        return "rows"
    if conv1d:
        return "cols"
    return None


def check_keys(modules: dict[str, ModuleKeys], adapter: Adapter, problems: ProblemSink) -> None:
    """The config promises what the file holds (DoRA magnitudes), and no module holds two kinds of pair."""
    dora.check_dora({n: m.roles.keys() for n, m in modules.items()}, adapter.config.use_dora, adapter.weights_path)
    for m in modules.values():
        if m.roles.keys() & {"A", "B"} and m.roles.keys() & {"emb_A", "emb_B"}:
            problems.add(f"{m.name}: both lora_A/B and lora_embedding_A/B are saved; the adapter file is corrupt")


ROLES = (
    Role(".lora_embedding_A", "emb_A"),
    Role(".lora_embedding_B", "emb_B"),
    Role(".lora_A.weight", "A"),
    Role(".lora_B.weight", "B"),
    Role(".lora_B.bias", "lora_bias", "bias"),
    *dora.ROLES,
    *tokens.ROLES,
)

TUNER = Tuner(
    peft_type="LORA",
    roles=ROLES,
    config_fields=frozenset({
        "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias", "lora_bias",
        "use_dora", "target_parameters", "trainable_token_indices", "init_lora_weights", "lora_dropout",
        # refused or checked when the config is read (adapter.py), inert for merging otherwise
        "layer_replication", "alora_invocation_tokens", "arrow_config", "kasa_config", "use_bdlora", "enable_lora",
        "megatron_config", "megatron_core", "eva_config", "use_qalora", "qalora_group_size", "velora_config",
        "monteclora_config", "lora_ga_config", "loftq_config", "corda_config",
    }),
    plan_module=plan_module,
    claim=experts.claim,
    check_keys=check_keys,
    plan_part=plan_part,
)
