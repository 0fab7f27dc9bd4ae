"""compressed-tensors FP8 (`quant_method: "compressed-tensors"`, `format: "float-quantized"`): RedHat / Neural
Magic `*-FP8-dynamic` and `*-FP8`, llm-compressor's output.

Each quantized Linear stores `weight` as F8_E4M3 `[R, C]` and `weight_scale` (a multiplier, in the model's dtype)
per output channel `[R, 1]` or per tensor `[1]`; static activations add `input_scale`. Modules on the config's
`ignore` list (names, or `re:` regexes matched from the start) stay in full precision; a quantized weight on that
list is a damaged checkpoint. transformers dequantizes a dense module through compressed-tensors' `_dequantize`:
`q.to(scale.dtype) * scale` computed in the scale's dtype (the exact e4m3 x bf16 product rounded once to bf16),
then cast to the parameter's dtype; MoE expert weights (per expert on disk, fused on load) through its own
`(q.float() * scale.float()).to(dtype)` (`integrations/compressed_tensors.py: CompressedTensorsDequantize`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError, UnsupportedError
from ...patterns import may_backtrack
from ..formats import DTYPES
from . import fp8
from .base import Buffers, QuantFormat, QuantTensor, RowSource, model_dtype, read

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo

# per-expert tensors transformers 5 fuses on load: their dequantization skips the scale-dtype rounding
_EXPERT = re.compile(r"\.experts\.\d+\.")
_SCALE_DTYPES = ("BF16", "F16", "F32")


def _ignored(module: str, ignore: list[Any]) -> str | None:
    """The `ignore` entry naming `module` (compressed-tensors' match_name), if any; class names cannot be told from
    a checkpoint and regexes that may backtrack are not tried (this is a consistency check only)."""
    for entry in ignore:
        if not isinstance(entry, str):
            continue
        if entry.startswith("re:"):
            pattern = entry.removeprefix("re:")
            if not may_backtrack(pattern):
                try:
                    if re.match(pattern, module):
                        return entry
                except re.error:
                    continue
        elif entry == module:
            return entry
    return None


def _check_groups(qc: Mapping[str, Any], root: Path) -> None:
    """Every config group quantizes weights to symmetric 8-bit floats by channel or tensor."""
    where = f"{root}/config.json: quantization_config"
    if qc.get("format") not in ("float-quantized", "naive-quantized"):
        raise UnsupportedError(f"{where} has format {qc.get('format')!r}; only compressed-tensors FP8 "
                               "('float-quantized') is supported, merge into the full-precision model instead")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError(f"{where} has no config_groups; the checkpoint's config is damaged")
    for name, group in groups.items():
        weights = (group or {}).get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if kind[:2] != ("float", 8) or kind[2] not in ("channel", "tensor") or not weights.get("symmetric", True):
            raise UnsupportedError(f"{where}.config_groups.{name} quantizes weights as {kind[0]} {kind[1]}-bit by "
                                   f"{kind[2]}; only symmetric FP8 per channel or per tensor is supported")
    if qc.get("quantization_status") not in (None, "compressed", "frozen"):
        raise UnsupportedError(f"{where}.quantization_status is {qc.get('quantization_status')!r}; only compressed "
                               "checkpoints are supported")


class CompressedFp8(QuantFormat):
    name = "compressed-tensors FP8"

    def accepts(self, scheme: str) -> bool:
        return scheme == "compressed-tensors"

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        qc = config.get("quantization_config") or config.get("compression_config") or {}
        _check_groups(qc, root)
        ignore = qc.get("ignore") or []
        dtype = model_dtype(config)
        out = []
        for g in groups:
            present = {role: disk[n] for role, n in g.parts.items()}
            if g.scheme != "FP8 (compressed-tensors)" or set(present) - {"weight", "weight_scale", "input_scale"}:
                raise UnsupportedError(f"base {root}: {g.weight} is stored as {sorted(present)} ({g.scheme}); only "
                                       "FP8 weights with a weight_scale (and input_scale) are supported")
            module = g.weight.removesuffix(".weight")
            hit = _ignored(module, ignore)
            if hit is not None:
                raise CheckpointError(f"{present['weight'].path}: {g.weight} is quantized but quantization_config."
                                      f"ignore lists it ({hit!r}); the checkpoint and its config disagree")
            out.append(self._tensor(g.weight, present, dtype))
        return out

    def _tensor(self, name: str, parts: dict[str, TensorInfo], dtype: str) -> QuantTensor:
        w, s = parts["weight"], parts["weight_scale"]
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise UnsupportedError(f"{w.path}: {name} is {w.dtype}{list(w.shape)}; only 2-D F8_E4M3 weights are "
                                   "supported in compressed-tensors checkpoints")
        if s.dtype not in _SCALE_DTYPES:
            raise UnsupportedError(f"{s.path}: {s.name} is {s.dtype}; FP8 weight scales must be BF16, F16 or F32")
        rows = w.shape[0]
        if s.shape in ((rows, 1),) and rows != 1:
            strategy = "channel"
        elif s.shape in ((), (1,), (1, 1)):
            strategy = "tensor"
        else:
            raise UnsupportedError(f"{s.path}: {s.name} is {list(s.shape)} for {name} {list(w.shape)}; only one "
                                   "scale per output channel ([rows, 1]) or per tensor ([1]) is supported")
        ordered = {"weight": w, "weight_scale": s}
        if "input_scale" in parts:
            ordered["input_scale"] = parts["input_scale"]
        return QuantTensor(name, w.shape, dtype, self, ordered,
                           {"strategy": strategy, "dense": _EXPERT.search(name) is None})

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        return _Rows(qt, reader)

    def requantizer(self, qt: QuantTensor) -> _Requant:
        return _Requant(qt)


class _Rows:
    def __init__(self, qt: QuantTensor, reader: TensorReader) -> None:
        self.w, self.s = qt.parts["weight"], qt.parts["weight_scale"]
        self.channel = qt.meta["strategy"] == "channel"
        # the dense path multiplies in the scale's dtype: the exact product rounded once to it
        self.round_to = DTYPES[self.s.dtype] if qt.meta["dense"] and self.s.dtype != "F32" else None
        self.reader, self.bufs = reader, Buffers()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        q = self.reader.next_rows(self.w, r0, r1)
        if self.channel:
            s = read(self.reader, self.bufs, self.s, r0, r1).float().reshape(-1, 1)
        else:
            s = read(self.reader, self.bufs, self.s, 0, self.s.rows).float().reshape(1, 1)
        out = self.bufs.f32("out", (r1 - r0, q.shape[1]))
        fp8.decode(q, out, self.bufs.get("index", q.numel() // 2 * 4).view(torch.int32))
        out.mul_(s)
        if self.round_to is not None:
            out.copy_(out.to(self.round_to))
        return out


class _Requant:
    """A fresh scale per row (channel) or per tensor: `amax / 448` rounded to the scale's dtype (an all-zero row
    gets the dtype's eps, as compressed-tensors' calculate_qparams), `q = e4m3(clamp(w / scale, +-448))` in
    float32. A per-tensor scale needs the amax of every merged row first (`whole_tensor`: the rows are computed
    twice)."""

    row_align = 1

    def __init__(self, qt: QuantTensor) -> None:
        self.qt = qt
        self.scale = qt.parts["weight_scale"]
        self.scale_dtype = DTYPES[self.scale.dtype]
        self.whole_tensor = qt.meta["strategy"] == "tensor"

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        return (r0, r1) if not self.whole_tensor else (0, self.scale.rows) if r0 == 0 else (0, 0)

    def session(self) -> _Session:
        return _Session(self)


class _Session:
    def __init__(self, rq: _Requant) -> None:
        self.rq, self.bufs = rq, Buffers()
        self.amax = torch.zeros((), dtype=torch.float32)

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        dtype = self.rq.scale_dtype
        s = (amax / fp8.FP8_MAX).to(dtype)
        return torch.where(s == 0, torch.finfo(dtype).eps, s).to(dtype)

    def observe(self, w: torch.Tensor, r0: int, r1: int) -> None:
        if w.numel():
            self.amax = torch.maximum(self.amax, fp8.row_amax(w).max())

    def quantize(self, w: torch.Tensor, r0: int, r1: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = self.rq.whole_tensor
        scale = self._scale(self.amax if whole else fp8.row_amax(w))
        scratch = self.bufs.f32("scratch", (w.numel(),))
        dq = fp8.quantize_rows(w, scale, q, scratch, self.bufs.get("index", w.numel() // 2 * 4).view(torch.int32))
        return (scale.reshape(self.rq.scale.shape) if whole else scale.reshape(-1, 1)), dq


FORMAT = CompressedFp8()
