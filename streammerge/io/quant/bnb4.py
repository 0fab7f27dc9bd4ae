"""bitsandbytes 4-bit (nf4 / fp4), with or without double quantization: QLoRA bases.

Each quantized Linear `M` stores `M.weight` as packed 4-bit codes (two per byte, high nibble first) over the
flattened `[R, C]` tensor, `M.weight.absmax` (one per block of `blocksize` flat values; U8 codes with double
quantization, then `nested_absmax` per 256 of them, `nested_quant_map` and `nested_offset`), `M.weight.quant_map`
(the 16-value code table) and `M.weight.quant_state.bitsandbytes__<type>` (JSON: shape, dtype, blocksize...).
bitsandbytes dequantizes `quant_map[code] * absmax[i // blocksize]` in float32 and rounds once to the dtype the
weight was quantized from (`functional.py: dequantize_4bit`), the double-quantized absmax being
`nested_quant_map[a] * nested_absmax[j // 256] + nested_offset` in float32 (`dequantize_blockwise`). Blocks run over
the flattened tensor (what `quantize_4bit` did; bitsandbytes 0.50's CPU kernel blocks each row instead, which
differs only when a row is not a whole number of blocks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError, UnsupportedError
from ..formats import TORCH_TO_ST
from .base import Buffers, QuantFormat, QuantTensor, RowSource, read, read_json_tensor

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo

_STATE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Bnb4(QuantFormat):
    name = "bitsandbytes 4-bit"
    keep_refusal = ("bitsandbytes' 4-bit quantizer is not reproduced here bit for bit (its CPU kernels block rows "
                    "differently from its CUDA ones), so merged weights cannot be written back as nf4/fp4")

    def accepts(self, scheme: str) -> bool:
        return scheme.startswith("bitsandbytes 4-bit")

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        from ..reader import TensorReader

        out = []
        with TensorReader() as reader:
            for g in groups:
                if not g.scheme.startswith("bitsandbytes 4-bit") or not {"weight", "absmax", "quant_map",
                                                                          "quant_state"} <= set(g.parts):
                    raise UnsupportedError(f"base {root}: {g.weight} is stored as {sorted(g.parts)} ({g.scheme}) in "
                                           "a bitsandbytes 4-bit checkpoint; its quantization state is incomplete")
                parts = {role: disk[n] for role, n in g.parts.items()}
                out.append(self._tensor(g.weight, parts, read_json_tensor(parts["quant_state"], reader)))
        return out

    def _tensor(self, name: str, parts: dict[str, TensorInfo], state: dict[str, Any]) -> QuantTensor:
        where = f"{parts['quant_state'].path}: {parts['quant_state'].name}"
        shape, blocksize, dtype = state.get("shape"), state.get("blocksize"), state.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and len(shape) == 2
                and isinstance(blocksize, int) and blocksize > 0 and dtype in _STATE_DTYPES
                and state.get("quant_type") in ("nf4", "fp4")):
            raise CheckpointError(f"{where} describes {state}; expected a 2-D shape, a blocksize, a float dtype and "
                                  "quant_type nf4/fp4: the checkpoint is damaged")
        n = math.prod(shape)
        nested = "nested_absmax" in parts
        w, absmax, qmap = parts["weight"], parts["absmax"], parts["quant_map"]
        problems = []
        if w.nbytes != (n + 1) // 2:
            problems.append(f"{w.name} holds {w.nbytes} bytes, not {(n + 1) // 2}")
        if absmax.shape != (-(-n // blocksize),) or absmax.dtype != ("U8" if nested else "F32"):
            problems.append(f"{absmax.name} is {absmax.dtype}{list(absmax.shape)}")
        if qmap.shape != (16,) or qmap.dtype != "F32":
            problems.append(f"{qmap.name} is {qmap.dtype}{list(qmap.shape)}")
        if nested:
            nb = state.get("nested_blocksize")
            if not (isinstance(nb, int) and nb > 0 and isinstance(state.get("nested_offset"), (int, float))
                    and "nested_quant_map" in parts
                    and parts["nested_absmax"].shape == (-(-absmax.shape[0] // nb),)):
                problems.append(f"the double quantization state ({parts['nested_absmax'].name}, nested_blocksize, "
                                "nested_offset, nested_quant_map) is inconsistent")
        if problems:
            raise CheckpointError(f"{where}: {'; '.join(problems)} for shape {shape} in blocks of {blocksize}: the "
                                  "checkpoint is damaged")
        ordered = {"weight": w, **{r: p for r, p in parts.items() if r != "weight"}}
        meta = {"blocksize": blocksize, "dtype": _STATE_DTYPES[dtype], "nested": nested,
                "nested_blocksize": state.get("nested_blocksize"), "offset": float(state.get("nested_offset", 0.0))}
        return QuantTensor(name, (shape[0], shape[1]), TORCH_TO_ST[_STATE_DTYPES[dtype]], self, ordered, meta)

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        return _Rows(qt, reader)


class _Rows:
    def __init__(self, qt: QuantTensor, reader: TensorReader) -> None:
        self.qt, self.reader, self.bufs = qt, reader, Buffers()
        self.cols = qt.shape[1]
        self.bs = qt.meta["blocksize"]
        self.code = read(reader, self.bufs, qt.parts["quant_map"], 0, 16).clone()
        self.nested_code = None
        if qt.meta["nested"]:
            self.nested_code = read(reader, self.bufs, qt.parts["nested_quant_map"], 0,
                                    qt.parts["nested_quant_map"].rows).clone()

    def _bytes(self, b0: int, b1: int) -> torch.Tensor:
        """Bytes [b0, b1) of the packed weight, whatever dtype it is stored in (quant_storage)."""
        w = self.qt.parts["weight"]
        per = w.row_nbytes
        k0, k1 = b0 // per, -(-b1 // per)
        raw = read(self.reader, self.bufs, w, k0, k1).reshape(-1).view(torch.uint8)
        return raw[b0 - k0 * per:b1 - k0 * per]

    def _absmax(self, j0: int, j1: int) -> torch.Tensor:
        a = read(self.reader, self.bufs, self.qt.parts["absmax"], j0, j1)
        if self.nested_code is None:
            return a
        nb = self.qt.meta["nested_blocksize"]
        k0 = j0 // nb
        nested = read(self.reader, self.bufs, self.qt.parts["nested_absmax"], k0, -(-j1 // nb))
        scale = nested.repeat_interleave(nb)[j0 - k0 * nb:j1 - k0 * nb]
        return self.nested_code[a.long()] * scale + self.qt.meta["offset"]

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        e0, e1 = r0 * self.cols, r1 * self.cols
        out = self.bufs.f32("out", (r1 - r0, self.cols))
        if e1 == e0:
            return out
        packed = self._bytes(e0 // 2, -(-e1 // 2))
        codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[e0 % 2:e0 % 2 + e1 - e0]
        j0, j1 = e0 // self.bs, -(-e1 // self.bs)
        absmax = self._absmax(j0, j1).repeat_interleave(self.bs)[e0 - j0 * self.bs:e1 - j0 * self.bs]
        flat = out.view(-1)
        torch.mul(self.code[codes.long()], absmax, out=flat)
        # rounded once to the dtype the weight was quantized from, as dequantize_4bit returns it
        flat.copy_(flat.to(self.qt.meta["dtype"]))
        return out


FORMAT = Bnb4()
