"""MXFP4 (`quant_method: "mxfp4"`): GPT-OSS's fused MoE experts.

`<p>_blocks` U8 `[E, R, G, 16]` holds 32 FP4 (E2M1) codes per group, two per byte (the even element in the low
nibble); `<p>_scales` U8 `[E, R, G]` one E8M0 exponent per group (bias 127). transformers dequantizes
`ldexp(lut[code], scale - 127)` (`integrations/mxfp4.py: convert_moe_packed_tensors`), exact in any float dtype,
and transposes each expert to its parameter layout `<p>` `[E, G*32, R]` (`[E, in, out]`), the name and layout a
bf16 GPT-OSS checkpoint uses. Rows here are experts; each is dequantized a slice of its output rows at a time
into the transposed buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CheckpointError, UnsupportedError
from .base import Buffers, QuantFormat, QuantTensor, RowSource, model_dtype

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo

# E2M1: bit 3 is the sign (so -0 exists)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# output rows of one expert dequantized at a time (bounds the temporaries to ~R_CHUNK x in float32)
R_CHUNK = 256


class Mxfp4(QuantFormat):
    name = "MXFP4"
    keep_refusal = ("MXFP4's quantizer (triton_kernels' downcast_to_mxfp) is not reproduced here bit for bit, so "
                    "merged experts cannot be written back as MXFP4")

    def accepts(self, scheme: str) -> bool:
        return scheme == "MXFP4"

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        dtype = model_dtype(config)
        out = []
        for g in groups:
            if g.scheme != "MXFP4" or set(g.parts) != {"blocks", "scales"}:
                raise UnsupportedError(f"base {root}: {g.weight} is {g.scheme} in an MXFP4 checkpoint; only "
                                       "`_blocks` + `_scales` pairs are supported")
            blocks, scales = disk[g.parts["blocks"]], disk[g.parts["scales"]]
            if len(blocks.shape) != 4 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
                raise CheckpointError(f"{blocks.path}: {blocks.name} {list(blocks.shape)} and {scales.name} "
                                      f"{list(scales.shape)} are not MXFP4 expert blocks [E, R, G, 16] and scales "
                                      "[E, R, G]; the checkpoint is damaged")
            e, r, groups_, _ = blocks.shape
            out.append(QuantTensor(g.weight, (e, groups_ * 32, r), dtype, self, {"blocks": blocks, "scales": scales}))
        return out

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        return _Rows(qt, reader)


def dequantize_expert(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, bufs: Buffers) -> None:
    """One expert: `blocks [R, G, 16]`, `scales [R, G]` (U8) into `out [G*32, R]` float32 (transposed)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    rows, groups, _ = blocks.shape
    for c0 in range(0, rows, R_CHUNK):
        c1 = min(rows, c0 + R_CHUNK)
        blk = blocks[c0:c1].reshape((c1 - c0) * groups, 16)
        vals = bufs.f32("vals", ((c1 - c0) * groups, 32))
        vals[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]
        vals[:, 1::2] = lut[(blk >> 4).to(torch.int)]
        exp = scales[c0:c1].reshape(-1, 1).to(torch.int32) - 127
        torch.ldexp(vals, exp, out=vals)
        out[:, c0:c1].copy_(vals.view(c1 - c0, groups * 32).t())


class _Rows:
    def __init__(self, qt: QuantTensor, reader: TensorReader) -> None:
        self.blocks, self.scales = qt.parts["blocks"], qt.parts["scales"]
        self.shape = qt.shape
        self.reader, self.bufs = reader, Buffers()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        _, n_in, n_out = self.shape
        out = self.bufs.f32("out", (r1 - r0, n_in * n_out))
        for e in range(r0, r1):
            blocks = self.reader.next_rows(self.blocks, e, e + 1)[0]
            scales = self.reader.read_rows(self.scales, e, e + 1, self.bufs.get("scales", self.scales.row_nbytes))[0]
            dequantize_expert(blocks, scales, out[e - r0].view(n_in, n_out), self.bufs)
        return out


FORMAT = Mxfp4()
