"""`--dtype keep`: a merged tensor of an FP8 base written back as FP8, with fresh scales.

The merged rows are computed exactly as for a full-precision output (dequantized base rows, the operations in
float32), then quantized block by block with the base's scheme (`io/quant`: same block size, scale name, dtype
and shape). The weight and its new scale go into one shard opened with `any_order`: the scale (F32 or BF16)
comes before the F8 weight in the file, but each block's scale rows are known only once its rows are. A scale
per tensor needs the largest merged value first: its rows are computed twice. How far quantization moved the
values from the float32 merge (max and mean absolute error) goes into the tensor's `RequantReport`.

A re-quantizer with a scale per block of rows or per row (`RequantRows`) quantizes each block on its own: the
blocks are computed on the compute threads like any merged block, each thread with its own session (working
buffers), and the codes and scale rows written in order. A scale per tensor (`whole_tensor`) needs every merged
row first: those tensors are computed on the thread that reads the base (`requantized_blocks`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from ..adapter import Adapter
from ..io.quant.base import RequantSession
from ..io.reader import TensorReader
from ..options import DEFAULT_BLOCK_BYTES
from ..plan import OutTensor
from .rows import BlockOut, TensorRows, Workspace


class RequantRows(TensorRows):
    """A merged tensor whose blocks come out re-quantized: `finish` writes a block's F8 codes into the caller's
    buffer and returns its scale rows (when the block completes some) as `BlockOut.scale`. Each thread quantizes
    with a session of its own; with `whole_tensor`, blocks go through `requantized_blocks` on one thread."""

    def __init__(self, t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 clamp_f16: bool = False) -> None:
        super().__init__(t, reader, lora, block_bytes, clamp_f16)
        assert t.quant is not None and t.quant.requant is not None and t.quant.report is not None
        self.requant, self.report = t.quant.requant, t.quant.report
        self._local = threading.local()   # one session per compute thread

    def session(self) -> RequantSession:
        """The calling thread's session (its working buffers; a per-tensor scale's observed amax)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.requant.session()
        return session

    def merged_f32(self, r0: int, r1: int, src: torch.Tensor, ws: Workspace) -> torch.Tensor:
        w = self.merged(r0, r1, src, ws)
        return w if w.dtype == torch.float32 else w.float()

    def finish(self, r0: int, r1: int, src: torch.Tensor, buf: torch.Tensor, ws: Workspace) -> BlockOut:
        w = self.merged_f32(r0, r1, src, ws)
        nbytes = self.out_nbytes(r0, r1)
        q = buf[:nbytes].view(torch.float8_e4m3fn).view(r1 - r0, self.cols)
        scale, dq = self.session().quantize(w, r0, r1, q)
        self.report.add(dq.sub_(w), w)
        s0, s1 = self.requant.scale_rows(r0, r1)
        # its own memory: the session reuses its buffers for the next block
        return BlockOut(q, scale=scale.contiguous().clone() if s1 > s0 else None)


def requantized_blocks(tr: RequantRows, take: Callable[[int], torch.Tensor]) -> Iterator[tuple[BlockOut, torch.Tensor]]:
    """Every block of `tr` re-quantized on the calling thread (a per-tensor scale sees every merged row first):
    each block's BlockOut and the buffer from `take` its codes are in (the caller's from then on)."""
    ws = Workspace()
    src_buf = torch.empty(tr.source_nbytes(0, min(tr.step, tr.rows)), dtype=torch.uint8)

    def source(r0: int, r1: int) -> torch.Tensor:
        return tr.source(r0, r1, src_buf)

    tr.prepass_here(source, ws)
    if tr.requant.whole_tensor:
        session = tr.session()
        for r0, r1 in tr.spans():
            session.observe(tr.merged_f32(r0, r1, source(r0, r1), ws), r0, r1)
    for r0, r1 in tr.spans():
        buf = take(tr.out_nbytes(r0, r1))
        yield tr.finish(r0, r1, source(r0, r1), buf, ws), buf
