"""Quantized bases in the plan: planning sees the logical tensors, then each output tensor learns where its rows come
from and, with `--dtype keep`, how it is written back.

`view` replaces each quantized group of the checkpoint by one full-precision-looking tensor (its logical name,
shape and dtype; the file position of its packed data), so layouts, tuners and tied-embedding rules work on the
names and shapes transformers' dequantized model has, and never see a scale or a code book. `finish` then:

* full-precision output (`--dtype bf16|f16|f32|auto`): each logical tensor is read dequantized (`OutTensor.quant`)
  and rounded once (after its delta, if merged); companions are gone and quantization_config is removed;
* `--dtype keep`: untouched groups are copied byte for byte, every part of them; a merged group's weight is
  re-quantized with fresh scales written under the base's scale name, dtype and shape (next to it, in the same
  shard), its other parts copied; quantization_config is kept. Formats without an exact quantizer (MXFP4,
  bitsandbytes) are refused when a merged tensor would need one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.quant import QuantizedBase, QuantRole, QuantTensor, RequantReport, read_quantized
from ..io.safetensors import TensorInfo
from .model import OutTensor

if TYPE_CHECKING:
    from .model import Plan


@dataclass
class QuantizedView:
    """A quantized checkpoint as planning sees it."""

    base: QuantizedBase
    checkpoint: Checkpoint                  # logical tensors in place of the groups
    infos: dict[str, TensorInfo]            # logical name -> the TensorInfo planning sees for it

    def finish(self, plan: Plan, dtype: str) -> None:
        """Attach each logical tensor's quantized source; with `keep`, plan the tensors written back."""
        keep = dtype == "keep"
        out: list[OutTensor] = []
        merged = untouched = 0
        for t in plan.tensors:
            qt = self.base.tensors.get(t.name) if t.base is not None and t.base is self.infos.get(t.name) else None
            if qt is None:
                out.append(t)
            elif not keep:
                if t.replacement is None:
                    t.quant = QuantRole(qt)
                merged += t.merged
                out.append(t)
            elif not t.merged:
                untouched += 1
                out += [OutTensor(p.name, p.dtype, p.shape, p) for p in qt.parts.values()]
            else:
                merged += 1
                out += _requantized(t, qt, plan.tensors)
        plan.tensors[:] = out
        self._notes(plan, keep, merged, untouched)

    def _notes(self, plan: Plan, keep: bool, merged: int, untouched: int) -> None:
        what = f"base quantized ({self.base.scheme}, {len(self.base.tensors)} quantized tensors)"
        if not keep:
            plan.notes.append(f"{what}: read dequantized as transformers loads it, {merged} merged; written in full "
                              "precision, quantization_config removed")
            return
        plan.notes.append(f"{what}: --dtype keep: {merged} merged tensors re-quantized with fresh scales, "
                          f"{untouched} copied byte for byte with their scales; quantization_config kept")
        if any(t.quant is not None and t.quant.requant is not None and "input_scale" in t.quant.tensor.parts
               for t in plan.tensors):
            plan.notes.append("the input_scale of each re-quantized tensor is copied unchanged: it is a calibration "
                              "of the activations, which merging cannot redo")
        # kept as the base has it: output_config drops the key and puts back the value given here
        plan.config_updates["quantization_config"] = dict(self.base.config)


def _requantized(t: OutTensor, qt: QuantTensor, planned: list[OutTensor]) -> list[OutTensor]:
    """A merged tensor written back in its base's quantization, its new scale, and its other parts copied."""
    if qt.fmt.keep_refusal:
        why = "; ".join(op.describe() for op in t.ops) or f"replaced by {t.replacement}"
        raise UnsupportedError(f"--dtype keep: {t.name} is {qt.fmt.name}-quantized in the base and the adapter "
                               f"changes it ({why}); {qt.fmt.keep_refusal}. Merge with --dtype bf16 (the merged "
                               "model in full precision) instead")
    rq = qt.fmt.requantizer(qt)
    t.dtype = qt.main.dtype
    t.quant = QuantRole(qt, requant=rq, report=RequantReport(t.name))
    scale = OutTensor(rq.scale.name, rq.scale.dtype, rq.scale.shape, rq.scale, quant=QuantRole(qt, scale_of=t.name))
    rest = [OutTensor(p.name, p.dtype, p.shape, p) for p in qt.parts.values() if p is not qt.main and p is not rq.scale]
    return [t, scale, *rest]


def view(ckpt: Checkpoint, config: Mapping[str, Any]) -> QuantizedView | None:
    """The logical view of a quantized checkpoint, or None for a full-precision one."""
    base = read_quantized(ckpt, config)
    if base is None:
        return None
    consumed = {n for qt in base.tensors.values() for n in qt.disk_names}
    at_main = {qt.main.name: qt for qt in base.tensors.values()}
    tensors: dict[str, TensorInfo] = {}
    infos: dict[str, TensorInfo] = {}
    for name, info in ckpt.tensors.items():
        qt = at_main.get(name)
        if qt is not None:
            if qt.name in ckpt.tensors and qt.name not in consumed:
                raise CheckpointError(f"{info.path}: {qt.name} is stored both as a tensor and as quantized "
                                      f"{', '.join(qt.disk_names)}; the checkpoint is damaged")
            main = qt.main
            infos[qt.name] = TensorInfo(qt.name, qt.dtype, qt.shape, main.path, main.offset, main.nbytes, main.stamp)
            tensors[qt.name] = infos[qt.name]
        elif name not in consumed:
            tensors[name] = info
    return QuantizedView(base, Checkpoint(ckpt.root, tensors, ckpt.files, ckpt.index_path), infos)
