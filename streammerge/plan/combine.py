"""Weighted combinations: several LoRA adapters merged into one output as `W + Σ w_i · s_i · B_i A_i`.

Each adapter is planned on its own (build_plan: every key used once, every shape checked), then the plans are
combined tensor by tensor: the LoRA operations of the same kind on an output tensor become one `WeightedLora`
(tuners/weighted.py), PEFT's `add_weighted_adapter(..., combination_type="cat")` followed by a merge. What PEFT's
combination does not turn into a weighted sum of deltas is refused before anything is written: DoRA, full
replacements (modules_to_save, saved base layers, resized vocabularies, bias="all"), trainable tokens, lora_bias,
target_parameters, and other adapter types.

The adapters are read through one `AdapterSet`, an `Adapter` whose keys are qualified by the member's position
(`"1:base_model.model...lora_A.weight"`), so the engine and verify read a combination's factors like any other.
"""

from __future__ import annotations

import filecmp
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapter import Adapter, load_adapter
from ..errors import PlanError, UnsupportedError
from ..io.sidefiles import is_tokenizer_file, read_base_config, side_files
from ..tuners.lora import LoraCols, LoraRows
from ..tuners.weighted import Term, WeightedLora
from .build import build_plan, plan_logical
from .model import OutTensor, Plan
from .quantized import view as quantized_view

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint
    from ..tuners.base import Op

_SEP = ":"


def member_key(i: int, key: str) -> str:
    """The key of member `i`'s tensor `key` in an AdapterSet."""
    return f"{i}{_SEP}{key}"


def split_member_key(qualified: str) -> tuple[int, str]:
    i, _, key = qualified.partition(_SEP)
    return int(i), key


@dataclass
class AdapterSet(Adapter):
    """Several adapters read as one: keys are `member_key(i, key)`. The config and paths are the first member's
    (they name the set in messages); tensors come from their own member."""

    members: tuple[Adapter, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, members: Sequence[Adapter]) -> AdapterSet:
        first = members[0]
        return cls(
            root=first.root, config=first.config, weights_path=first.weights_path,
            shapes={member_key(i, k): s for i, m in enumerate(members) for k, s in m.shapes.items()},
            dtypes={member_key(i, k): d for i, m in enumerate(members) for k, d in m.dtypes.items()},
            members=tuple(members),
        )

    def member(self, qualified: str) -> tuple[Adapter, str]:
        i, key = split_member_key(qualified)
        return self.members[i], key

    def get(self, key: str) -> torch.Tensor:
        m, k = self.member(key)
        return m.get(k)

    def get_f32(self, key: str) -> torch.Tensor:
        m, k = self.member(key)
        return m.get_f32(k)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        m, k = self.member(key)
        return m.read_rows(k, start, stop, out)

    def factor(self, key: str) -> torch.Tensor:
        m, k = self.member(key)
        return m.factor(k)

    def trim_factors(self) -> None:
        for m in self.members:
            m.trim_factors()

    def close(self) -> None:
        for m in self.members:
            m.close()


def open_adapters(dirs: Sequence[Path]) -> AdapterSet:
    """Load every adapter of a combination (closing the ones opened when a later one fails)."""
    opened: list[Adapter] = []
    try:
        for d in dirs:
            opened.append(load_adapter(d))
    except BaseException:
        for a in opened:
            a.close()
        raise
    return AdapterSet.of(opened)


def check_weights(adapters: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    """One finite number per adapter; 1 each when none are given (the adapters' deltas added, as PEFT computes
    with several adapters active at once)."""
    if weights is None:
        return (1.0,) * adapters
    values = tuple(float(w) for w in weights)
    if len(values) != adapters:
        raise ValueError(f"{len(values)} weight(s) for {adapters} adapter(s): give one weight per adapter")
    bad = [w for w in values if w != w or w in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"weights must be finite numbers, not {bad[0]}")
    return values


def is_combination(adapters: int, weights: Sequence[float] | None) -> bool:
    """Several adapters, or one with a weight, are merged as a weighted combination."""
    return adapters > 1 or weights is not None


def plan_adapters(ckpt: Checkpoint, adapter_dirs: Sequence[Path], weights: Sequence[float] | None = None, *,
                  dtype: str = "bf16", loader: str = "auto") -> tuple[Plan, Adapter]:
    """The plan of one output and the adapter the engine reads its factors from (the caller closes it): a single
    adapter planned as it is, or a weighted combination (several adapters, or one with a weight)."""
    if not is_combination(len(adapter_dirs), weights):
        lora = load_adapter(adapter_dirs[0])
        try:
            return build_plan(ckpt, lora, dtype=dtype, loader=loader), lora
        except BaseException:
            lora.close()
            raise
    check_weights(len(adapter_dirs), weights)
    combined = open_adapters(adapter_dirs)
    try:
        return plan_combination(ckpt, combined, weights, dtype=dtype, loader=loader), combined
    except BaseException:
        combined.close()
        raise


def plan_combination(ckpt: Checkpoint, adapters: AdapterSet, weights: Sequence[float] | None, *, dtype: str = "bf16",
                     loader: str = "auto") -> Plan:
    """Plan `W + Σ w_i s_i B_i A_i` over every tensor: each member planned alone, then combined."""
    values = check_weights(len(adapters.members), weights)
    for a in adapters.members:
        _refuse_config(a)
    # a quantized base: the members are planned on one logical view, which the combined plan is finished with
    base_config = read_base_config(ckpt.root)
    quant = quantized_view(ckpt, base_config)
    logical = ckpt if quant is None else quant.checkpoint
    plans = [plan_logical(logical, a, dtype=dtype, loader=loader, base_config=base_config) for a in adapters.members]
    for i, (a, p) in enumerate(zip(adapters.members, plans)):
        _refuse_plan(a, p, i)
    _refuse_tie_conflicts(adapters.members, plans)

    base_names = list(logical.tensors)
    names = base_names + [t.name for p in plans for t in p.tensors if t.name not in ckpt.tensors]
    by_plan = [{t.name: t for t in p.tensors} for p in plans]
    tensors = []
    for name in dict.fromkeys(names):
        versions = [(i, bp[name]) for i, bp in enumerate(by_plan) if name in bp]
        tensors.append(_combine_tensor(name, versions, values, adapters))
    config_updates: dict[str, object] = {}
    for a, p in zip(adapters.members, plans):
        for key, value in p.config_updates.items():
            if config_updates.get(key, value) != value:
                raise PlanError(f"{a.weights_path}: the adapters of the combination disagree on config.json field "
                                f"{key!r} ({config_updates[key]!r} / {value!r}); merge them one at a time")
            config_updates[key] = value
    notes = [f"adapter {i + 1} ({a.root}): {n}" for i, (a, p) in enumerate(zip(adapters.members, plans))
             for n in p.notes]
    layouts = list(dict.fromkeys(p.layout for p in plans))
    plan = Plan(tensors, ", ".join(layouts), config_updates, notes, sum(p.adapter_keys for p in plans))
    if quant is not None:
        quant.finish(plan, dtype)
    return plan


def _combine_tensor(name: str, versions: list[tuple[int, OutTensor]], weights: Sequence[float],
                    adapters: AdapterSet) -> OutTensor:
    """One output tensor from every plan that has it: the same source, its LoRA operations combined."""
    first = versions[0][1]
    for i, t in versions[1:]:
        if (t.dtype, t.shape, t.base) != (first.dtype, first.shape, first.base):
            raise PlanError(f"{adapters.members[i].weights_path}: {name} is planned as {t.dtype}{list(t.shape)} "
                            f"here but as {first.dtype}{list(first.shape)} for an earlier adapter of the "
                            "combination; merge them one at a time")
    groups: dict[tuple[bool, tuple[int, int] | None], list[Term]] = {}
    for i, t in versions:
        for op in t.ops:
            cols = isinstance(op, LoraCols)
            assert isinstance(op, (LoraRows, LoraCols))  # anything else was refused by _refuse_plan
            out_rows = op.out_rows if isinstance(op, LoraRows) else None
            groups.setdefault((cols, out_rows), []).append(
                Term(member_key(i, op.a), member_key(i, op.b), float(weights[i]), op.scale, op.module))
    ops: list[Op] = [WeightedLora(tuple(terms), cols, out_rows) for (cols, out_rows), terms in groups.items()]
    return OutTensor(name, first.dtype, first.shape, first.base, ops=ops)


_CONFIG_REFUSALS = (
    ("use_dora", "DoRA rescales the whole weight W + ΔW by its magnitude vector, so a combination is not a weighted "
                 "sum of deltas (PEFT's add_weighted_adapter gives it a new magnitude instead)"),
    ("target_parameters", "target_parameters (LoRA on fused expert parameters): PEFT's add_weighted_adapter refuses "
                          "these adapters too"),
    ("trainable_token_indices", "trainable tokens replace embedding rows with saved values, not a delta a weight "
                                "can scale"),
    ("modules_to_save", "modules_to_save saves whole replacement modules, not deltas: PEFT keeps one adapter's copy "
                        "(and refuses two that save the same module), which is not a weighted sum"),
    ("lora_bias", "lora_bias: PEFT's add_weighted_adapter combines only lora_A/lora_B, the biases are not weighted"),
)


def _refusal(a: Adapter, what: str) -> UnsupportedError:
    return UnsupportedError(f"{a.config.path}: {what}; it cannot be part of a weighted combination: merge this "
                            "adapter on its own (or first, then combine the others into that output)")


def _refuse_config(a: Adapter) -> None:
    if a.config.peft_type != "LORA":
        raise _refusal(a, f"a {a.config.peft_type} adapter; PEFT's add_weighted_adapter combines LoRA adapters "
                          "only")
    for name, why in _CONFIG_REFUSALS:
        if a.config.raw.get(name):
            raise _refusal(a, why)


def _refuse_plan(a: Adapter, plan: Plan, i: int) -> None:
    """What the config does not announce: saved base layers, resized vocabularies, bias replacements, and any
    operation other than a plain LoRA delta."""
    for t in plan.tensors:
        if t.replacement is not None:
            raise _refusal(a, f"{t.name} is replaced by the adapter's saved tensor {t.replacement} (a full "
                              "replacement: saved base layer, resized vocabulary or bias='all'/'lora_only'), not a "
                              "delta a weight can scale")
        for op in t.ops:
            plain = isinstance(op, LoraCols) or (isinstance(op, LoraRows) and op.expert is None
                                                 and op.b_rows is None)
            if not plain:
                raise _refusal(a, f"{t.name}: {op.describe()} is not a plain LoRA delta (lora_A/lora_B)")


def _refuse_tie_conflicts(members: Sequence[Adapter], plans: Sequence[Plan]) -> None:
    """ensure_weight_tying keeps a tied embedding and head one tensor holding the delta; another adapter of the
    combination that unties them (a delta on one side only) contradicts it."""
    if not any(a.config.ensure_weight_tying for a in members):
        return
    shapes = {(tuple(t.name for t in p.tensors), tuple(sorted(p.config_updates.items()))) for p in plans}
    if len(shapes) > 1:
        which = next(a for a in members if a.config.ensure_weight_tying)
        raise _refusal(which, "ensure_weight_tying keeps the tied embedding and output embedding one tensor, while "
                              "another adapter of the combination gives them different values")


def combined_side_files(base_dir: Path, adapter_dirs: Sequence[Path]) -> dict[str, Path]:
    """The non-weight files of a combination's output, as for one adapter: the base's, with the tokenizer files of
    the adapters that ship some (those must ship the same files, byte for byte: the output has one tokenizer)."""
    shipping = [d for d in adapter_dirs if any(p.is_file() and is_tokenizer_file(p.name) for p in d.iterdir())]
    chosen = shipping or list(adapter_dirs[:1])
    first = side_files(base_dir, chosen[0])
    for d in chosen[1:]:
        other = side_files(base_dir, d)
        differ = sorted(set(first) ^ set(other)) or [rel for rel in first
                                                      if not filecmp.cmp(first[rel], other[rel], shallow=False)]
        if differ:
            raise UnsupportedError(f"{d}: ships tokenizer files other than {chosen[0]}'s ({differ[0]} differs); the "
                                   "combined model can have only one tokenizer: make the adapters' tokenizer files "
                                   "identical, or remove them from all but one adapter folder")
    return first
