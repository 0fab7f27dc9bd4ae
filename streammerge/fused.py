"""Module tensors that transformers cuts out of one fused checkpoint tensor when it loads a model.

Some checkpoints store several projections as one tensor (lara_mini's `linear_attn.in_proj` holds the rows of
`in_proj_qkv`, `in_proj_z`, `in_proj_b` and `in_proj_a`); transformers splits it on load with a `WeightConverter`
(`Split` sized by the model's parameters, or `Chunk` into equal parts), so PEFT adapters name the split modules.
Each such module is a block of rows of the disk tensor, and its LoRA delta is added to those rows. The row ranges
come from the converter itself, evaluated against the model built on the meta device (no weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


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
            for target, size in zip(targets, sizes or [None] * len(targets)):
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
