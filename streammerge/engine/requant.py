"""`--dtype keep`: a merged tensor of an FP8 base written back as FP8, with fresh scales.

The merged rows are computed exactly as for a full-precision output (dequantized base rows, the operations in
float32), then quantized block by block with the base's scheme (`io/quant`: same block size, scale name, dtype
and shape). The weight and its new scale go into one shard opened with `any_order`: the scale (F32 or BF16)
comes before the F8 weight in the file, but each block's scale rows are known only once its rows are. A scale
per tensor needs the largest merged value first: its rows are computed twice. How far quantization moved the
values from the float32 merge (max and mean absolute error) goes into the tensor's `RequantReport`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapter import Adapter
from ..io.reader import TensorReader
from ..io.writer import ShardWriter
from ..plan import OutTensor
from .pipeline import BufferPool, WriteBehind
from .rows import TensorRows


def emit_requantized(t: OutTensor, by_name: dict[str, OutTensor], writer: ShardWriter, reader: TensorReader,
                     lora: Adapter, block_bytes: int, sink: WriteBehind, pool: BufferPool, bar: Any) -> int:
    """Queue the re-quantized rows of `t` and the rows of its new scale; returns the bytes queued."""
    assert t.quant is not None and t.quant.requant is not None and t.quant.report is not None
    rq, report = t.quant.requant, t.quant.report
    scale_t = by_name[rq.scale.name]
    tr = TensorRows(t, reader, lora, block_bytes)
    tr.prepass()
    session = rq.session()  # its buffers go with it when this tensor is done
    if rq.whole_tensor:
        for r0, r1 in tr.spans():
            session.observe(_f32(tr.merged(r0, r1)), r0, r1)
    total = 0
    for r0, r1 in tr.spans():
        w = _f32(tr.merged(r0, r1))
        nbytes = (r1 - r0) * tr.cols
        buf = pool.take(nbytes)
        q = buf[:nbytes].view(torch.float8_e4m3fn).view(r1 - r0, tr.cols)
        scale, dq = session.quantize(w, r0, r1, q)
        report.add(dq.sub_(w), w)
        s0, s1 = rq.scale_rows(r0, r1)
        if s1 > s0:
            scale = scale.contiguous().clone()  # its own memory: the requantizer reuses its buffers

            def write_scale(scale: torch.Tensor = scale) -> None:
                writer.write(scale_t.name, scale)

            sink.submit(write_scale)
            total += scale.numel() * scale.element_size()

        def write(q: torch.Tensor = q) -> None:
            writer.write(t.name, q)

        sink.submit(write, buf)
        total += nbytes
        if bar is not None:
            bar.update(nbytes)
    if bar is not None:
        bar.update(scale_t.nbytes)
    return total


def _f32(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype == torch.float32 else w.float()
