"""Full replacements: adapter tensors that are the new value of a base tensor (`modules_to_save`, the saved
`base_layer.weight` of a targeted embedding, bias="all"), possibly with a resized vocabulary (spec §10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedError
from ..io.formats import TORCH_TO_ST
from ..options import output_dtype
from .keys import same_values
from .tied import Tie

if TYPE_CHECKING:
    from ..tuners.base import PlanContext


def plan_replacements(replacements: dict[str, str], ctx: PlanContext, tie: Tie | None, input_embedding: str | None,
                      dtype: str, notes: list[str]) -> None:
    """Point each replaced output tensor at its adapter tensor (shape, dtype), checking it fits."""
    adapter, problems = ctx.adapter, ctx.problems
    for module_tensor, key in replacements.items():
        if module_tensor in ctx.parts:
            raise UnsupportedError(f"{adapter.weights_path}: {key} replaces {module_tensor}, which is cut out of the "
                                   f"fused checkpoint tensor {ctx.parts[module_tensor].disk} on load; replacing part "
                                   "of a tensor is not supported: merge it with PEFT instead")
        shape = adapter.shapes[key]
        if tie is not None and module_tensor in tie.optional:
            emb_module = next((m for m in replacements if ctx.to_disk(m) == input_embedding), None)
            if emb_module is not None and same_values(adapter, key, replacements[emb_module]):
                # the head is saved as a copy of the (replaced) tied embedding: one tensor, still tied
                notes.append(f"{key} equals the tied input embedding; kept tied")
                continue
        t = ctx.target(module_tensor)
        if t is None:
            continue
        vocab_like = t.name == input_embedding or module_tensor.split(".")[-2:-1] == ["lm_head"]
        if shape != t.shape and not (vocab_like and len(shape) == 2 and shape[1:] == t.shape[1:]):
            problems.add(f"{module_tensor}: adapter tensor {key} has shape {list(shape)} but base {t.name} is "
                         f"{list(t.shape)}")
            continue
        t.replacement = key
        t.shape = shape
        src = TORCH_TO_ST.get(adapter.dtypes[key])
        if src is None:
            problems.add(f"{key}: dtype {adapter.dtypes[key]} cannot be written")
            continue
        t.dtype = output_dtype(dtype, t.base.dtype if t.base is not None else src)
