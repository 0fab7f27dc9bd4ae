"""FP8 block-wise (`quant_method: "fp8"`): DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8.

Each quantized Linear stores `weight` as F8_E4M3 `[R, C]` and `weight_scale_inv` `[ceil(R/bm), ceil(C/bn)]`, the
dequantization multiplier of each `bm x bn` block (partial edge blocks have their own scale); `weight_block_size:
null` means one scale for the whole tensor. transformers dequantizes `q.float() * scale.float()` and rounds once to
the parameter's dtype (`integrations/finegrained_fp8.py: Fp8Dequantize._dequantize_one`, which derives the block
from the scale grid; the configured block is used here, which is what that grid means and what its block-aware
`_dequantize_fp8_weight` does for partial edge blocks). Scales may be F32, BF16 or F16 (Qwen3), or E8M0 bytes
(`2 ** (s - 127)`). A static activation scheme adds `activation_scale`/`input_scale`, dropped when dequantizing
(an activation statistic means nothing to a full-precision linear) and copied when keeping FP8.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError, UnsupportedError
from ..formats import DTYPES
from . import fp8
from .base import Buffers, QuantFormat, QuantTensor, RowSource, model_dtype, read

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo

_FLOAT_SCALES = ("F32", "BF16", "F16")
_BYTE_SCALES = ("U8", "F8_E8M0")


def scale_f32(s: torch.Tensor) -> torch.Tensor:
    """Scale values as float32, exactly as transformers widens them (E8M0 bytes: 2 ** (s - 127))."""
    if s.dtype == torch.uint8:
        return (s.to(torch.float32) - 127.0).exp2()
    return s.to(torch.float32)


class Fp8Block(QuantFormat):
    name = "FP8 block-wise"

    def accepts(self, scheme: str) -> bool:
        return scheme in ("FP8 block-wise", "FP8")

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        qc = config.get("quantization_config") or {}
        block = qc.get("weight_block_size")
        if qc.get("expert_dtype") not in (None, "fp8"):
            raise UnsupportedError(f"base {root}: FP8 with expert_dtype {qc.get('expert_dtype')!r} (packed FP4 "
                                   "experts) cannot be read yet; only FP8 weights with float scales are supported")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{root}/config.json: quantization_config.weight_block_size is {block!r}; expected "
                                  "[rows, cols] or null")
        dtype = model_dtype(config)
        out = []
        for g in groups:
            if g.scheme != "FP8 block-wise" or "weight_scale_inv" not in g.parts:
                raise UnsupportedError(f"base {root}: {g.weight} is {g.scheme} without a weight_scale_inv beside "
                                       "it, in an FP8 block-wise checkpoint; this layout is not supported")
            w, s = disk[g.parts["weight"]], disk[g.parts["weight_scale_inv"]]
            out.append(self._tensor(g, w, s, block, dtype, disk, root))
        return out

    def _tensor(self, g: QuantGroup, w: TensorInfo, s: TensorInfo, block: list[int] | None, dtype: str,
                disk: Mapping[str, TensorInfo], root: Path) -> QuantTensor:
        where = f"{w.path}: {w.name}"
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise UnsupportedError(f"{where} is {w.dtype}{list(w.shape)} beside {s.name}; only 2-D F8_E4M3 "
                                   "weights are supported in FP8 block-wise checkpoints")
        if s.dtype not in _FLOAT_SCALES + _BYTE_SCALES:
            raise UnsupportedError(f"{s.path}: {s.name} is {s.dtype}; FP8 scales must be F32, BF16, F16 or E8M0")
        rows, cols = w.shape
        if block is None:
            bm, bn = rows, cols
            want: tuple[int, ...] = (1, 1)
            if s.shape not in ((), (1,), (1, 1)):
                raise CheckpointError(f"{s.path}: {s.name} is {list(s.shape)} but weight_block_size is null (one "
                                      "scale per tensor); the checkpoint and its config disagree")
        else:
            bm, bn = block
            want = (-(-rows // bm), -(-cols // bn))
            if s.shape != want:
                raise CheckpointError(f"{s.path}: {s.name} is {list(s.shape)} but {w.name} {list(w.shape)} in blocks "
                                      f"of {block} needs {list(want)} scales; the checkpoint and its config disagree")
        parts = {"weight": w, "weight_scale_inv": s}
        for role in ("input_scale", "activation_scale"):
            name = g.weight.removesuffix("weight") + role
            if name in disk:
                parts[role] = disk[name]
        return QuantTensor(w.name, w.shape, dtype, self, parts, {"block": (bm, bn), "grid": want})

    def row_align(self, qt: QuantTensor) -> int:
        return int(qt.meta["block"][0])

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        return _Rows(qt, reader)

    def requantizer(self, qt: QuantTensor) -> _Requant:
        return _Requant(qt)


class _Rows:
    def __init__(self, qt: QuantTensor, reader: TensorReader) -> None:
        self.w, self.s = qt.parts["weight"], qt.parts["weight_scale_inv"]
        self.bm, self.bn = qt.meta["block"]
        self.grid = qt.meta["grid"]
        self.reader, self.bufs = reader, Buffers()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        q = self.reader.next_rows(self.w, r0, r1)
        k0, k1 = r0 // self.bm, -(-r1 // self.bm) if r1 > r0 else r0 // self.bm
        if self.s.shape in ((), (1,)):
            s = scale_f32(read(self.reader, self.bufs, self.s, 0, 1)).reshape(1, 1)
        else:
            s = scale_f32(read(self.reader, self.bufs, self.s, k0, k1)).reshape(k1 - k0, self.grid[1])
        out = self.bufs.f32("out", (r1 - r0, q.shape[1]))
        fp8.decode(q, out, self.bufs.get("index", q.numel() // 2 * 4).view(torch.int32))
        return fp8.scale_blocks(out, s, r0, self.bm, self.bn)


class _Requant:
    """Fresh `weight_scale_inv` blocks for merged rows (transformers' Fp8Quantize; see fp8.py)."""

    whole_tensor = False

    def __init__(self, qt: QuantTensor) -> None:
        self.qt = qt
        self.scale = qt.parts["weight_scale_inv"]
        self.bm, self.bn = qt.meta["block"]
        self.row_align = self.bm
        if self.scale.dtype not in _FLOAT_SCALES:
            raise UnsupportedError(f"{self.scale.path}: {self.scale.name} is {self.scale.dtype} (power-of-two E8M0 "
                                   "scales); re-quantizing into them is not supported: merge with --dtype bf16")
        if self.scale.shape in ((), (1,)):
            raise UnsupportedError(f"{self.scale.path}: {self.scale.name} is one scale for the whole tensor "
                                   "(weight_block_size: null); re-quantizing that layout is not supported: merge "
                                   "with --dtype bf16")
        self.scale_dtype = DTYPES[self.scale.dtype]

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 // self.bm, -(-r1 // self.bm)

    def session(self) -> _Session:
        return _Session(self)


class _Session:
    def __init__(self, rq: _Requant) -> None:
        self.rq, self.bufs = rq, Buffers()

    def observe(self, w: torch.Tensor, r0: int, r1: int) -> None:
        raise AssertionError("block scales need no pass over the whole tensor")

    def quantize(self, w: torch.Tensor, r0: int, r1: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rq = self.rq
        n, cols = w.shape
        padded = -(-n // rq.bm) * rq.bm * -(-cols // rq.bn) * rq.bn
        scratch = self.bufs.f32("scratch", (padded,))
        pad = self.bufs.f32("pad", (padded,)) if padded != n * cols else None
        index = self.bufs.get("index", n * cols // 2 * 4).view(torch.int32)
        return fp8.quantize_blocks(w, rq.bm, rq.bn, rq.scale_dtype, q, scratch, pad, index, rq.qt.name)


FORMAT = Fp8Block()
