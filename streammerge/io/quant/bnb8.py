"""LLM.int8 (bitsandbytes `load_in_8bit`).

Each quantized Linear `M` stores `M.weight` I8 `[R, C]`, `M.SCB` F32 `[R]` (the absmax of each row) and
`M.weight_format` U8 (0: row-major). bitsandbytes dequantizes `W * SCB[:, None] * 7.874015718698502e-3` in float32,
left to right (`_ops.py: int8_vectorwise_dequant`; the constant is 1/127 as a float32, not a division by 127).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError, UnsupportedError
from .base import Buffers, QuantFormat, QuantTensor, RowSource, model_dtype, read

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo

INV_127 = 7.874015718698502e-3


class Bnb8(QuantFormat):
    name = "bitsandbytes 8-bit (LLM.int8)"
    keep_refusal = "LLM.int8's quantizer is not reproduced here, so merged weights cannot be written back as int8"

    def accepts(self, scheme: str) -> bool:
        return scheme == "bitsandbytes 8-bit"

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        from ..reader import TensorReader

        dtype = model_dtype(config)
        out = []
        with TensorReader() as reader:
            for g in groups:
                if g.scheme != "bitsandbytes 8-bit" or not {"weight", "SCB"} <= set(g.parts):
                    raise UnsupportedError(f"base {root}: {g.weight} is stored as {sorted(g.parts)} ({g.scheme}) in "
                                           "an LLM.int8 checkpoint; its quantization state is incomplete")
                w, scb = disk[g.parts["weight"]], disk[g.parts["SCB"]]
                if w.dtype != "I8" or len(w.shape) != 2 or scb.shape != (w.shape[0],) or scb.dtype != "F32":
                    raise CheckpointError(f"{w.path}: {w.name} {w.dtype}{list(w.shape)} with {scb.name} "
                                          f"{scb.dtype}{list(scb.shape)} is not an LLM.int8 weight; the checkpoint "
                                          "is damaged")
                parts = {"weight": w, "SCB": scb}
                if "weight_format" in g.parts:
                    fmt = disk[g.parts["weight_format"]]
                    value = int(reader.read_rows(fmt, 0, fmt.rows).reshape(-1)[0]) if fmt.numel == 1 else -1
                    if value != 0:
                        raise UnsupportedError(f"{fmt.path}: {fmt.name} is {value}, not 0 (row-major); only "
                                               "row-major LLM.int8 weights are supported")
                    parts["weight_format"] = fmt
                out.append(QuantTensor(g.weight, w.shape, dtype, self, parts))
        return out

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        return _Rows(qt, reader)


class _Rows:
    def __init__(self, qt: QuantTensor, reader: TensorReader) -> None:
        self.w, self.scb = qt.parts["weight"], qt.parts["SCB"]
        self.reader, self.bufs = reader, Buffers()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        q = self.reader.next_rows(self.w, r0, r1)
        scb = read(self.reader, self.bufs, self.scb, r0, r1)
        out = self.bufs.f32("out", tuple(q.shape))
        torch.mul(q, scb.view(-1, 1), out=out)
        return out.mul_(INV_127)


FORMAT = Bnb8()
