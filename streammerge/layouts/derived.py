"""Layouts only transformers knows: the base's own renamings, and module tensors it cuts out of fused ones.

When no built-in layout places every adapter tensor and transformers is importable (an optional extra), the
base's model is built on the meta device (no weights) and its conversion mapping is asked.

Some checkpoints store several projections as one tensor (lara_mini's `linear_attn.in_proj` holds the rows of
`in_proj_qkv`, `in_proj_z`, `in_proj_b` and `in_proj_a`); transformers splits it on load with a `WeightConverter`
(`Split` sized by the model's parameters, or `Chunk` into equal parts), so PEFT adapters name the split modules.
Each such module is a block of rows of the disk tensor, and its LoRA delta is added to those rows. The row ranges
come from the converter itself, evaluated against the model built on the meta device (no weights).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import Layout


@dataclass(frozen=True)
class FusedPart:
    """A module tensor that is part of a fused disk tensor: its rows there, or why they cannot be told."""

    disk: str
    rows: tuple[int, int] | None   # [start, stop) along dim 0 of the disk tensor; None: not a block of rows
    how: str                        # the converter, for messages


def split_parts(model: Any, disk: Mapping[str, Any], renamings: list, converters: Iterable) -> dict[str, FusedPart]:
    """Module tensor name -> FusedPart for every tensor a one-to-many converter makes from a disk tensor.

    `disk` maps disk names to headers (with `.shape`); `renamings` are applied first, as transformers does.
    """
    from transformers.core_model_loading import Chunk, Split, apply_renamings

    converters = list(converters)
    parts: dict[str, FusedPart] = {}
    for disk_name, header in disk.items():
        renamed = apply_renamings(disk_name, renamings)
        for conv in converters:
            new, pattern = conv.rename_source_key(renamed)
            if pattern is None:
                continue
            if len(conv.source_patterns) != 1 or len(conv.target_patterns) < 2:
                break  # fusing several disk tensors into one module tensor: not a split
            first = conv.target_patterns[0]
            targets = [new.replace(first, t, 1) for t in conv.target_patterns]
            ops = list(conv.operations)
            how = f"{pattern} -> {', '.join(conv.target_patterns)} ({', '.join(type(op).__name__ for op in ops)})"
            sizes = _row_sizes(model, targets, ops, header.shape, Chunk, Split)
            start = 0
            for target, size in zip(targets, sizes or [None] * len(targets)):  # type: ignore[list-item]
                if size is None:
                    parts[target] = FusedPart(disk_name, None, how)
                else:
                    parts[target] = FusedPart(disk_name, (start, start + size), how)
                    start += size
            break
    return parts


def _row_sizes(model: Any, targets: list[str], ops: list, shape: tuple[int, ...], chunk: type,
               split: type) -> list[int] | None:
    """How many rows of the disk tensor each target takes, when the conversion is a plain cut along dim 0."""
    if len(ops) != 1 or getattr(ops[0], "dim", None) != 0 or not shape:
        return None
    op, rows = ops[0], shape[0]
    if type(op) is split:
        try:
            sizes = [model.get_parameter(t).shape[0] for t in targets]
        except (AttributeError, KeyError):
            return None
    elif type(op) is chunk and getattr(op, "num_shards_attribute", None) is None:
        if rows % len(targets):
            return None
        sizes = [rows // len(targets)] * len(targets)
    else:
        return None
    return sizes if sum(sizes) == rows else None


def derived_layout(root: Path, disk: Mapping[str, Any]) -> Layout | None:
    """The base's own disk -> module renames, as transformers applies them when it loads this checkpoint.

    Only used when no built-in layout places every adapter tensor, and only when transformers is importable: the
    model is built on the meta device (no weights), and each disk name goes through its `WeightRenaming`s.
    Converters that fuse tensors are left out (adapters address the tensors they produce by the renamed name);
    converters that split one disk tensor into several module tensors give their row ranges (`Layout.parts`).
    """
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            apply_renamings,
        )

        config = transformers.AutoConfig.from_pretrained(str(root))
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls(config)
        mapping = get_model_conversion_mapping(model)
        renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
        parts = split_parts(model, disk, renamings, [c for c in mapping if isinstance(c, WeightConverter)])
    except Exception:
        return None
    names: dict[str, str] = {}
    for disk_name in disk:
        module_name = apply_renamings(disk_name, renamings)
        if module_name in names:  # two disk tensors for one module tensor: not a plain renaming
            return None
        names[module_name] = disk_name
    for module_name, part in parts.items():
        names.setdefault(module_name, part.disk)
    from . import Layout

    return Layout("transformers", (), names, parts or None)


def transformers_available() -> bool:
    """Whether derived_layout can ask transformers at all (it is an optional extra)."""
    return importlib.util.find_spec("transformers") is not None


