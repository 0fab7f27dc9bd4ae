"""Stream every planned tensor into its shard: raw byte copies for untouched tensors, row blocks computed in
float32 for the others, queued to a write-behind thread so disk waits overlap the math."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import CheckpointError
from ..io.reader import TensorReader
from ..io.sharding import PlannedTensor
from ..io.writer import ShardWriter
from ..memory import MemoryMonitor, fmt_bytes
from ..plan import OutTensor, Plan
from .pipeline import BufferPool, WriteBehind
from .requant import emit_requantized
from .rows import merged_rows


def write_shards(plan: Plan, shards: list[list[PlannedTensor]], names: list[str], dest: Path, lora: Adapter,
                 block_bytes: int, progress: bool, mem: MemoryMonitor, clamp_f16: bool) -> int:
    """Write every shard of `plan` into `dest`; returns the tensor bytes written. A failure aborts (deletes) the
    shards begun, unless the writer thread is stuck in a write (then they go with the staging folder)."""
    by_name = {t.name: t for t in plan.tensors}
    # one block being computed, `depth` queued, one being written: bounded whatever the model's size
    depth = 2
    pool = BufferPool(depth + 2, block_bytes)
    sink = WriteBehind(pool, depth)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
    written = 0
    writers: list[ShardWriter] = []
    try:
        with TensorReader() as reader:
            for shard, name in zip(shards, names):
                # a re-quantized weight's scale comes before it in the file but is computed with it
                writer = ShardWriter(dest / name, shard, writeback=True, any_order=bool(plan.glued))
                writers.append(writer)
                order = [by_name[p.name] for p in writer.order]
                for i, t in enumerate(order):
                    nxt = order[i + 1].base if i + 1 < len(order) else None
                    if nxt is not None:
                        reader.prefetch(nxt)
                    if bar is not None:
                        bar.set_postfix_str(f"{t.name[-40:]} | RAM {fmt_bytes(mem.current())}", refresh=False)
                    if t.quant is not None and t.quant.requant is not None:
                        written += emit_requantized(t, by_name, writer, reader, lora, block_bytes, sink, pool, bar)
                    elif t.quant is None or t.quant.scale_of is None:  # a new scale is written with its weight
                        written += _emit(t, writer, reader, lora, block_bytes, sink, pool, bar, clamp_f16)
                sink.submit(writer.close)
            sink.finish()
    except BaseException:
        if sink.abort():
            for w in writers:
                w.abort()
        # else the writer thread is stuck inside a write (a stalled disk): its files go with the staging folder
        raise
    finally:
        if bar is not None:
            bar.close()
    return written


def _emit(t: OutTensor, writer: ShardWriter, reader: TensorReader, lora: Adapter, block_bytes: int,
          sink: WriteBehind, pool: BufferPool, bar: Any, clamp_f16: bool = False) -> int:
    """Queue one output tensor: a raw byte copy, or row blocks computed in float32 and rounded once."""
    if t.raw_copy:
        info = t.base
        assert info is not None

        def copy() -> None:
            try:
                with reader.opened(info.path, info.stamp) as fd:
                    writer.copy_from(t.name, fd, info.offset, info.nbytes)
            except CheckpointError:
                reader.check(info)  # a source that ended early: name the file that changed
                raise
            reader.check(info)  # a file rewritten in place during the copy has a new mtime
            reader.release(info)

        sink.submit(copy)
        if bar is not None:
            bar.update(t.nbytes)
        return t.nbytes
    total = 0
    from_base = t.base is not None and t.replacement is None and t.quant is None
    for r0, r1, y, buf in merged_rows(t, reader, lora, block_bytes, clamp_f16, take=pool.take):

        def write(y: torch.Tensor = y, r0: int = r0, r1: int = r1) -> None:
            writer.write(t.name, y)
            if from_base:
                # the rows are in `y`: their source pages can go (on this thread, which has slack; the main
                # thread's math is the critical path)
                reader.release(t.base, r0, r1)  # type: ignore[arg-type]  # from_base: not None

        sink.submit(write, buf)
        n = y.numel() * y.element_size()
        total += n
        if bar is not None:
            bar.update(n)
    return total
