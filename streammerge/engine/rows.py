"""One output tensor, row block by row block: read the source rows, apply the planned operations in float32,
check the result, round once to the output dtype.

Blocks are whole matmul tiles (`kernels.tile_rows`), so the output bytes do not depend on the block size. Source
rows are read with pread (never mapped: a file truncated meanwhile is an error, not SIGBUS) into buffers reused
by every block; the base's next block is read ahead while this one is computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from .. import kernels
from ..adapter import Adapter
from ..errors import NumericError
from ..io.formats import DTYPES
from ..io.reader import TensorReader
from ..io.safetensors import TensorInfo
from ..options import DEFAULT_BLOCK_BYTES
from ..plan import OutTensor
from ..tuners.base import Block, Prepared

F16_MAX = 65504.0


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Row-block math on one intra-op thread: with two, OpenMP workers spin between the many small kernels and
    starve the writer thread (measured on the 1.7B model, 2 cores: 25 s wall with 2 threads, 7.6 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_rows(block_bytes: int, cols: int, align: int = 1) -> int:
    """Rows per block: whole tiles, so the merged bytes do not depend on the block size (and whole multiples of
    `align`: rows of a quantized tensor that share their scales)."""
    tile = math.lcm(kernels.tile_rows(cols), align)
    return max(tile, block_bytes // (max(cols, 1) * 4) // tile * tile)


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class TensorRows:
    """The rows of one planned output tensor, viewed 2-D as `[rows, cols]` (ConvNd kernels and fused experts'
    matrices flattened into cols)."""

    def __init__(self, t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 clamp_f16: bool = False) -> None:
        self.t, self.reader, self.lora, self.clamp_f16 = t, reader, lora, clamp_f16
        self.rows = t.shape[0] if t.shape else 1
        self.cols = math.prod(t.shape[1:]) if t.shape else 1
        self.out_dtype = DTYPES[t.dtype]
        qt = t.quant.tensor if t.quant is not None else None
        self.step = block_rows(block_bytes, self.cols, qt.fmt.row_align(qt) if qt is not None else 1)
        self.ops: list[Prepared] = [op.prepare(lora) for op in t.ops]
        # a quantized base's rows come dequantized, in float32
        self.quant = qt.rows(reader) if qt is not None and t.replacement is None else None
        src_dtype = lora.dtypes[t.replacement] if t.replacement is not None else _base(t).torch_dtype
        # half <-> half casts (bf16 -> f16) run ~3x faster on the CPU through float32 than directly
        half = (torch.float16, torch.bfloat16)
        self.via_f32 = (not self.ops and self.quant is None and src_dtype in half and self.out_dtype in half
                        and src_dtype != self.out_dtype)
        # float32 scratch reused by every block of this tensor: no allocation (and no page faults) per block
        size = min(self.step, self.rows) * self.cols
        self._scratch = torch.empty(size, dtype=torch.float32) if self.ops or self.via_f32 else None
        self._second: torch.Tensor | None = None  # for the ops that want one, made on first use
        self._src_buf = None
        if t.replacement is not None:
            self._src_buf = reader.buffer(size * lora.dtypes[t.replacement].itemsize)

    def spans(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.rows, self.step):
            yield r0, min(self.rows, r0 + self.step)

    def source(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor the merge starts from (the base, or the adapter's replacement), as stored
        (a quantized base's dequantized, in float32)."""
        t = self.t
        if t.replacement is not None:
            return self.lora.read_rows(t.replacement, r0, r1, self._src_buf).reshape(r1 - r0, self.cols)
        if self.quant is not None:
            return self.quant.rows(r0, r1)
        return self.reader.next_rows(_base(t), r0, r1).reshape(r1 - r0, self.cols)

    def _view(self, buf: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
        assert buf is not None
        return buf[: (r1 - r0) * self.cols].view(r1 - r0, self.cols)

    def _block(self, r0: int, r1: int) -> Block:
        def second() -> torch.Tensor:
            if self._second is None:
                assert self._scratch is not None
                self._second = torch.empty_like(self._scratch)
            return self._view(self._second, r0, r1)

        return Block(r0, r1, second)

    def compute(self, r0: int, r1: int, src: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """The block in float32 after the operations (the first `upto` of them)."""
        w = self._view(self._scratch, r0, r1)
        w.copy_(src)
        block = self._block(r0, r1)
        for p in self.ops[:upto]:
            p.apply(w, block)
        return w

    def prepass(self) -> None:
        """Operations that need every row first (DoRA's column norms) see each block before any is written."""
        for i, p in enumerate(self.ops):
            if p.prepass:
                for r0, r1 in self.spans():
                    p.observe(self.compute(r0, r1, self.source(r0, r1), upto=i))

    def merged(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) ready to be rounded: float32 when computed or cast through float32, else the source."""
        src = self.source(r0, r1)
        if self.ops:
            w = self.compute(r0, r1, src)
            if not kernels.all_finite(w):
                bad = kernels.nonfinite_count(w)
                origin = "the base tensor already has NaN/Inf values" if kernels.nonfinite_count(src) else \
                    "the adapter's delta made them"
                raise NumericError(f"{self.t.name}: {bad} NaN/Inf values in the merged rows {r0}..{r1 - 1} "
                                   f"({origin}); check the base and adapter files")
            return w
        if self.via_f32:
            w = self._view(self._scratch, r0, r1)
            w.copy_(src)
            return w
        return src


def _base(t: OutTensor) -> TensorInfo:
    assert t.base is not None, f"{t.name}: planned without a source"
    return t.base


def merged_rows(
    t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
    clamp_f16: bool = False, blocks: Callable[[int, int], bool] | None = None,
    take: Callable[[int], torch.Tensor] = _new_buffer,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield `(r0, r1, rows, buffer)`: rows of the output tensor in the output dtype as a 2-D `[rows, cols]`
    view into `buffer` (a byte buffer from `take(nbytes)`, which the caller owns from then on).

    `blocks(r0, r1)` may skip blocks; a DoRA column norm still reads every row.
    """
    tr = TensorRows(t, reader, lora, block_bytes, clamp_f16)
    tr.prepass()
    itemsize = torch.empty((), dtype=tr.out_dtype).element_size()
    overflow: list[int] = []  # [count, first row] once float16 overflow was seen: count it all, then refuse
    for r0, r1 in tr.spans():
        if blocks is not None and not blocks(r0, r1):
            continue
        w = tr.merged(r0, r1)
        if tr.out_dtype == torch.float16 and w.dtype != torch.float16:
            count, first = f16_overflow(w)
            if count and not clamp_f16:
                overflow = overflow or [0, r0 + first]
                overflow[0] += count
            elif count:
                w = w.clamp(-F16_MAX, F16_MAX)
        if overflow:
            continue
        nbytes = (r1 - r0) * tr.cols * itemsize
        buf = take(nbytes)
        y = buf[:nbytes].view(tr.out_dtype).view(r1 - r0, tr.cols)
        y.copy_(w)
        yield r0, r1, y, buf
    if overflow:
        raise NumericError(f"{t.name}: {overflow[0]} values exceed the float16 range (first in row {overflow[1]}); "
                           "use --dtype bf16 or f32, or pass --clamp-f16 to clamp them to +-65504")


def f16_overflow(w: torch.Tensor) -> tuple[int, int]:
    """(how many finite values of `w` exceed float16's range, the first such row)."""
    if w.numel() == 0:
        return 0, -1
    lo, hi = torch.aminmax(w)
    if lo >= -F16_MAX and hi <= F16_MAX:  # one pass for the common case (NaN fails both and is counted below)
        return 0, -1
    over = (w.abs() > F16_MAX) & torch.isfinite(w)
    if not bool(over.any()):
        return 0, -1
    return int(over.sum()), int(over.reshape(w.shape[0], -1).any(dim=1).nonzero()[0][0])
