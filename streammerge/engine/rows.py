"""One output tensor, row block by row block: read the source rows, apply the planned operations in float32,
check the result, round once to the output dtype.

Blocks are whole matmul tiles (`kernels.tile_rows`), so the output bytes do not depend on the block size, nor on
which thread computes a block: a `TensorRows` is shared by the compute threads, each of which brings its own
`Workspace` (scratch buffers). Source rows are read with pread (never mapped: a file truncated meanwhile is an
error, not SIGBUS) into buffers the caller owns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    """Every torch call on one intra-op thread: with two, OpenMP workers spin between the many small kernels and
    starve the writer thread (measured on the 1.7B model, 2 cores: 25 s wall with 2 threads, 7.6 s with 1). The
    engine's parallelism is whole row blocks on threads of its own (they inherit this setting)."""
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


class Workspace:
    """The float32 scratch buffers of one compute thread, reused by every block it computes (grown on demand)."""

    def __init__(self) -> None:
        self._f32 = [torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.float32)]

    def f32(self, slot: int, numel: int) -> torch.Tensor:
        if self._f32[slot].numel() < numel:
            self._f32[slot] = torch.empty(0, dtype=torch.float32)  # let the old one go first
            self._f32[slot] = torch.empty(numel, dtype=torch.float32)
        return self._f32[slot][:numel]


@dataclass
class BlockOut:
    """What computing one block gave: its rounded rows (None when float16 overflow kept it from being written), the
    overflow seen (how many values, the first row), and for a re-quantized block its scale rows."""

    rows: torch.Tensor | None
    overflow: int = 0
    first: int = -1
    scale: torch.Tensor | None = None   # a re-quantized block's new scale rows (engine/requant.py)


class TensorRows:
    """The rows of one planned output tensor, viewed 2-D as `[rows, cols]` (ConvNd kernels and fused experts'
    matrices flattened into cols). Shared by the threads that compute its blocks; the operations are prepared
    once, on the thread that builds it."""

    def __init__(self, t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 clamp_f16: bool = False) -> None:
        self.t, self.reader, self.lora, self.clamp_f16 = t, reader, lora, clamp_f16
        self.rows = t.shape[0] if t.shape else 1
        self.cols = math.prod(t.shape[1:]) if t.shape else 1
        self.out_dtype = DTYPES[t.dtype]
        self.out_itemsize = torch.empty((), dtype=self.out_dtype).element_size()
        qt = t.quant.tensor if t.quant is not None else None
        self.step = block_rows(block_bytes, self.cols, qt.fmt.row_align(qt) if qt is not None else 1)
        self.ops: list[Prepared] = [op.prepare(lora) for op in t.ops]
        # a quantized base's rows come dequantized, in float32 (read and dequantized on the reading thread)
        self.quant = qt.rows(reader) if qt is not None and t.replacement is None else None
        self.src_dtype = (lora.dtypes[t.replacement] if t.replacement is not None else
                          torch.float32 if self.quant is not None else _base(t).torch_dtype)
        # half <-> half casts (bf16 -> f16) run ~3x faster on the CPU through float32 than directly
        half = (torch.float16, torch.bfloat16)
        self.via_f32 = (not self.ops and self.src_dtype in half and self.out_dtype in half
                        and self.src_dtype != self.out_dtype)

    def spans(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.rows, self.step):
            yield r0, min(self.rows, r0 + self.step)

    def source_nbytes(self, r0: int, r1: int) -> int:
        return (r1 - r0) * self.cols * self.src_dtype.itemsize

    def out_nbytes(self, r0: int, r1: int) -> int:
        return (r1 - r0) * self.cols * self.out_itemsize

    def source(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) of the tensor the merge starts from (the base, or the adapter's replacement), as stored,
        read into the byte buffer `out` (at least `source_nbytes` long)."""
        t = self.t
        if t.replacement is not None:
            return self.lora.read_rows(t.replacement, r0, r1, out).reshape(r1 - r0, self.cols)
        if self.quant is not None:
            rows = out[:self.source_nbytes(r0, r1)].view(torch.float32).view(r1 - r0, self.cols)
            return rows.copy_(self.quant.rows(r0, r1))  # the format's buffers are reused by its next block
        return self.reader.read_rows(_base(t), r0, r1, out).reshape(r1 - r0, self.cols)

    def compute(self, r0: int, r1: int, src: torch.Tensor, ws: Workspace, upto: int | None = None) -> torch.Tensor:
        """The block in float32 after the operations (the first `upto` of them), in `ws`'s scratch."""
        n = (r1 - r0) * self.cols
        w = ws.f32(0, n).view(r1 - r0, self.cols)
        w.copy_(src)
        block = Block(r0, r1, lambda: ws.f32(1, n).view(r1 - r0, self.cols))
        for p in self.ops[:upto]:
            p.apply(w, block)
        return w

    def partial(self, i: int, r0: int, r1: int, src: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Block [r0, r1)'s share of the prepass statistic of operation `i` (see `Prepared.partial`)."""
        return self.ops[i].partial(self.compute(r0, r1, src, ws, upto=i))

    def prepasses(self) -> list[int]:
        return [i for i, p in enumerate(self.ops) if p.prepass]

    def prepass_here(self, source: Callable[[int, int], torch.Tensor], ws: Workspace) -> None:
        """Every prepass statistic computed on the calling thread, block after block (`source(r0, r1)`: the rows)."""
        for i in self.prepasses():
            for r0, r1 in self.spans():
                self.ops[i].combine(self.partial(i, r0, r1, source(r0, r1), ws))
            self.ops[i].settle()

    def merged(self, r0: int, r1: int, src: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Rows [r0, r1) ready to be rounded: float32 when computed or cast through float32, else the source."""
        if self.ops:
            w = self.compute(r0, r1, src, ws)
            if not kernels.all_finite(w):
                bad = kernels.nonfinite_count(w)
                origin = "the base tensor already has NaN/Inf values" if kernels.nonfinite_count(src) else \
                    "the adapter's delta made them"
                raise NumericError(f"{self.t.name}: {bad} NaN/Inf values in the merged rows {r0}..{r1 - 1} "
                                   f"({origin}); check the base and adapter files")
            return w
        if self.via_f32:
            w = ws.f32(0, (r1 - r0) * self.cols).view(r1 - r0, self.cols)
            w.copy_(src)
            return w
        return src

    def finish(self, r0: int, r1: int, src: torch.Tensor, buf: torch.Tensor, ws: Workspace) -> BlockOut:
        """Rows [r0, r1) merged, checked and rounded once into the byte buffer `buf`."""
        w = self.merged(r0, r1, src, ws)
        if self.out_dtype == torch.float16 and w.dtype != torch.float16:
            count, first = f16_overflow(w)
            if count and not self.clamp_f16:
                return BlockOut(None, count, r0 + first)
            if count:
                w = w.clamp(-F16_MAX, F16_MAX)
        nbytes = self.out_nbytes(r0, r1)
        y = buf[:nbytes].view(self.out_dtype).view(r1 - r0, self.cols)
        y.copy_(w)
        return BlockOut(y)


def f16_overflow_error(name: str, count: int, first: int) -> NumericError:
    return NumericError(f"{name}: {count} values exceed the float16 range (first in row {first}); use --dtype bf16 "
                        "or f32, or pass --clamp-f16 to clamp them to +-65504")


def _base(t: OutTensor) -> TensorInfo:
    assert t.base is not None, f"{t.name}: planned without a source"
    return t.base


def merged_rows(t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
                clamp_f16: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield `(r0, r1, rows)` computed on the calling thread: rows of the output tensor in the output dtype as a
    2-D `[rows, cols]` tensor of its own. The engine (stream.py) computes the same blocks on several threads; this
    is the plain sequential form of the same steps."""
    tr = TensorRows(t, reader, lora, block_bytes, clamp_f16)
    ws = Workspace()

    def source(r0: int, r1: int) -> torch.Tensor:
        return tr.source(r0, r1, _new_buffer(tr.source_nbytes(r0, r1)))

    tr.prepass_here(source, ws)
    overflow: list[int] = []  # [count, first row] once float16 overflow was seen: count it all, then refuse
    for r0, r1 in tr.spans():
        out = tr.finish(r0, r1, source(r0, r1), _new_buffer(tr.out_nbytes(r0, r1)), ws)
        if out.rows is None:
            overflow = overflow or [0, out.first]
            overflow[0] += out.overflow
        if not overflow and out.rows is not None:
            yield r0, r1, out.rows
    if overflow:
        raise f16_overflow_error(t.name, overflow[0], overflow[1])


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
