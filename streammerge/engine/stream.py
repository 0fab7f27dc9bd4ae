"""Stream every planned tensor of one or more outputs into their shards in one pass over the sources.

The main thread reads each source row block once (pread into a pooled buffer); compute threads merge it for every
output that needs it (float32, rounded once); one writer thread per group of outputs writes the blocks in the order
they were submitted. Untouched tensors are copied as raw bytes (copy_file_range), in chunks every output copies in
turn, so a base larger than the page cache is still read from disk once. A quantized base's rows are dequantized
as they are read; `--dtype keep` tensors are re-quantized block by block (engine/requant.py) and written with
their new scale rows.

An output that fails (a NaN, float16 overflow, a full disk) is marked failed and its shards deleted; the others go
on. With a single output the failure is raised at once, as a plain merge does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import CheckpointError
from ..io.journal import Journal, Resumable
from ..io.reader import TensorReader
from ..io.sharding import PlannedTensor
from ..memory import MemoryMonitor, fmt_bytes
from ..plan import OutTensor, Plan
from .groups import Member, pass_order, waves
from .outputs import Output, OutputState
from .pipeline import BufferPool, ComputePool, Countdown, WriteBehind
from .requant import RequantRows, requantized_blocks
from .rows import BlockOut, TensorRows, f16_overflow_error

RAW_CHUNK = 64 * 2**20        # untouched tensors are copied in chunks of this size, every output in turn


def write_shards(plan: Plan, shards: list[list[PlannedTensor]], names: list[str], dest: Path, lora: Adapter,
                 block_bytes: int, progress: bool, mem: MemoryMonitor, clamp_f16: bool, threads: int = 1,
                 journal: Journal | None = None, reuse: Resumable | None = None) -> int:
    """Write every shard of `plan` into `dest`; returns the tensor bytes written. A failure aborts (deletes) the
    shards begun, unless a writer thread is stuck in a write (then they go with the staging folder).

    With a `journal`, every finished shard (and every CHECKPOINT_BYTES inside one) is recorded in it; `reuse`
    names the shards, and the tensors of partial shards, that a killed run already wrote and need not be written.
    """
    out = Output(plan, shards, names, dest, lora, clamp_f16, journal, reuse)
    run_pass([out], block_bytes, threads, progress, mem)
    return out.written


def run_pass(outputs: list[Output], block_bytes: int, threads: int, progress: bool, mem: MemoryMonitor | None,
             any_order: bool | None = None) -> None:
    """Write every output's shards in one pass over the sources. With one output its failure is raised; with
    several, each failure is left in `Output.error` and the others are completed."""
    _Pass(outputs, block_bytes, threads, progress, mem, len(outputs) > 1 if any_order is None else any_order).run()


class _Pass:
    def __init__(self, outputs: list[Output], block_bytes: int, threads: int, progress: bool,
                 mem: MemoryMonitor | None, any_order: bool) -> None:
        self.outputs, self.block_bytes, self.mem = outputs, block_bytes, mem
        self.threads = max(1, threads)
        self.single = len(outputs) == 1
        lanes = max(1, min(len(outputs), self.threads))
        self.lanes = [WriteBehind(2 * self.threads + 4, f"streammerge-writer-{i}") for i in range(lanes)]
        # a re-quantized weight's new scale comes before it in the file but is computed with it: any_order
        self.states = [OutputState(o, self.lanes[i % lanes], any_order or bool(o.plan.glued))
                       for i, o in enumerate(outputs)]
        self.src_pool = BufferPool(self.threads + 2, block_bytes)
        self.out_pool = BufferPool(self.threads + 2 * lanes + 1, block_bytes)
        self.compute = ComputePool(self.threads)
        self.reader = TensorReader()
        self.bar: Any = None
        if progress:
            from tqdm import tqdm

            total = sum(o.plan.total_bytes for o in outputs)
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


    # -- the pass ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            with self.reader:
                groups = pass_order(self.outputs)
                for gi, group in enumerate(groups):
                    nxt = groups[gi + 1][0].t if gi + 1 < len(groups) else None
                    if nxt is not None and nxt.base is not None and nxt.replacement is None and nxt.quant is None:
                        self.reader.prefetch(nxt.base)
                    members = [m for m in group if self._live(m.out)]
                    if members:
                        self._group(members)
                    if not self.single:
                        for m in group:
                            self.outputs[m.out].lora.trim_factors()
                for st in self.states:
                    self._submit(st, st.close_rest)
                for lane in self.lanes:
                    lane.finish()
                self._live(0)  # a single output's failure in its last task
        except BaseException:
            self.compute.close()
            stopped = [lane.abort() for lane in self.lanes]  # every lane, not up to the first stuck one
            if all(stopped):
                for st in self.states:
                    st.abort_writers()
            # else a writer thread is stuck inside a write (a stalled disk): its files go with the staging folder
            raise
        finally:
            self.compute.close()
            if self.bar is not None:
                self.bar.close()

    def _live(self, i: int) -> bool:
        """Whether output `i` is still being written; a single output's failure is raised here."""
        err = self.outputs[i].error
        if err is not None and self.single:
            raise err
        return err is None

    def _fail(self, st: OutputState, e: BaseException, on_lane: bool) -> None:
        if st.out.error is None:
            st.out.error = e
        if on_lane:
            st.abort_writers()
        else:
            st.lane.submit(st.abort_writers)

    def _submit(self, st: OutputState, fn: Callable[[], Any], cleanup: Callable[[], None] | None = None) -> None:
        """Queue `fn` on the output's writer thread; it is skipped once the output failed, and its failure is the
        output's."""
        def task() -> None:
            if st.out.error is not None:
                return
            try:
                fn()
            except Exception as e:
                self._fail(st, e, on_lane=True)

        st.lane.submit(task, cleanup)

    def _progress(self, m: Member, nbytes: int) -> None:
        self.outputs[m.out].written += nbytes
        if self.bar is not None:
            if self.mem is not None:
                self.bar.set_postfix_str(f"{m.t.name[-40:]} | RAM {fmt_bytes(self.mem.current())}", refresh=False)
            self.bar.update(nbytes)

    # -- one source tensor --------------------------------------------------------------------------------------------

    def _group(self, members: list[Member]) -> None:
        for m in members:
            if _whole_tensor_requant(m.t):
                self._requantize(m)
        # a new scale (`scale_of`) is written with its weight
        members = [m for m in members if not _whole_tensor_requant(m.t) and (m.t.quant is None or
                                                                               m.t.quant.dequantizes)]
        if not members:
            return
        raws = [m for m in members if m.t.raw_copy]
        computed = [m for m in members if not m.t.raw_copy]
        parts = waves(computed, self.outputs)
        for n, wave in enumerate(parts):
            ready = [m for m in wave if self._prepare(m)]
            if ready:
                self._blocks(ready, raws if n == 0 else [])
                raws = [] if n == 0 else raws
            for m in wave:
                m.rows = None  # the factors go as soon as the blocks are written
        if raws:
            self._copy(raws)

    def _prepare(self, m: Member) -> bool:
        st = self.states[m.out]
        try:
            rows = RequantRows if m.t.quant is not None and m.t.quant.requant is not None else TensorRows
            m.rows = rows(m.t, self.reader, st.out.lora, self.block_bytes, st.out.clamp_f16)
            self._prepass(m)
            if isinstance(m.rows, RequantRows):
                self._progress(m, m.rows.requant.scale.nbytes)  # written with the blocks
        except _SourceError as e:
            raise e.error from None  # the base changed: every output is affected
        except Exception as e:
            self._fail(st, e, on_lane=False)
            self._live(m.out)
            return False
        return True

    def _prepass(self, m: Member) -> None:
        """Statistics over every row (DoRA's column norms): blocks computed on the pool, reduced in block order."""
        tr = m.rows
        assert tr is not None
        for i in tr.prepasses():
            pending: list[tuple[Any, torch.Tensor]] = []
            try:
                for r0, r1 in tr.spans():
                    buf = self.src_pool.take(tr.source_nbytes(r0, r1))
                    pending.append((None, buf))
                    src = self._source(m, r0, r1, buf)
                    pending[-1] = (self.compute.submit(tr.partial, i, r0, r1, src), buf)
                    if len(pending) > self.threads:
                        self._combine(tr, i, pending)
                while pending:
                    self._combine(tr, i, pending)
            finally:
                for future, buf in pending:  # a failure: wait for the blocks still using their buffers
                    self._settled(future, buf)
            tr.ops[i].settle()

    def _combine(self, tr: TensorRows, i: int, pending: list[tuple[Any, torch.Tensor]]) -> None:
        """The oldest block's share added to the statistic (in block order), its buffer freed."""
        future, buf = pending[0]
        part = future.result()
        pending.pop(0)
        self.src_pool.give(buf)
        tr.ops[i].combine(part)

    def _settled(self, future: Any, buf: torch.Tensor) -> None:
        """Wait until `future`'s block is done with `buf` (cancelled, failed or computed), then free `buf`."""
        if future is not None and not future.cancel():
            future.exception()
        self.src_pool.give(buf)

    def _source(self, m: Member, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) of `m`'s source. A base that fails to read fails every output (CheckpointError is raised
        past the output's own failure handling); an adapter's replacement only `m`'s output."""
        assert m.rows is not None
        try:
            return m.rows.source(r0, r1, buf)
        except CheckpointError as e:
            if m.t.replacement is None:
                raise _SourceError(e) from e
            raise

    def _blocks(self, members: list[Member], raws: list[Member]) -> None:
        """Every row block of the source read once, then computed for each member (and copied for `raws`)."""
        head = members[0].rows
        assert head is not None
        base = head.t.base if head.t.replacement is None and head.t.quant is None else None
        for r0, r1 in head.spans():
            live = [m for m in members + raws if self._live(m.out)]
            if not live:
                return
            buf = self.src_pool.take(head.source_nbytes(r0, r1))
            try:
                src = self._source(members[0], r0, r1, buf)
            except _SourceError as e:
                self.src_pool.give(buf)
                raise e.error from None
            except Exception as e:  # the adapter's replacement: only its output fails
                self.src_pool.give(buf)
                self._fail(self.states[members[0].out], e, on_lane=False)
                self._live(members[0].out)
                return
            except BaseException:
                self.src_pool.give(buf)
                raise

            def free(buf: torch.Tensor = buf, r0: int = r0, r1: int = r1) -> None:
                self.src_pool.give(buf)
                if base is not None:
                    self.reader.release(base, r0, r1)  # the rows are read: their pages can go

            done = Countdown(len(live), free)
            for m in live:
                if m.t.raw_copy:
                    self._submit(self.states[m.out], functools.partial(self._write, m, src), done.tick)
                    self._progress(m, src.numel() * src.element_size())
                else:
                    self._compute(m, r0, r1, src, done)
        for m in members + raws:
            if self._live(m.out):
                self._submit(self.states[m.out], functools.partial(self._tensor_done, m))

    def _compute(self, m: Member, r0: int, r1: int, src: torch.Tensor, done: Countdown) -> None:
        tr, st = m.rows, self.states[m.out]
        assert tr is not None
        nbytes = tr.out_nbytes(r0, r1)
        buf = self.out_pool.take(nbytes)
        future = self.compute.submit(tr.finish, r0, r1, src, buf)

        def write() -> None:
            out: BlockOut = st.lane.wait(future)
            if out.rows is None or m.overflow:
                if out.overflow:
                    m.overflow = m.overflow or [0, out.first]
                    m.overflow[0] += out.overflow
                return
            if out.scale is not None:
                assert isinstance(tr, RequantRows)
                self._write_named(st, tr.requant.scale.name, out.scale)
            self._write(m, out.rows)

        def cleanup() -> None:
            try:
                st.lane.wait(future)  # the block may still be computing into `buf` when its output failed
            except BaseException:  # its failure, if any, was the task's to report
                pass
            self.out_pool.give(buf)
            done.tick()

        self._submit(st, write, cleanup)
        self._progress(m, nbytes)

    def _requantize(self, m: Member) -> None:
        """`--dtype keep`: the merged rows re-quantized on this thread, written with their new scale rows."""
        st = self.states[m.out]
        assert m.t.quant is not None and m.t.quant.requant is not None
        scale = m.t.quant.requant.scale.name
        try:
            tr = RequantRows(m.t, self.reader, st.out.lora, self.block_bytes)
            for out, buf in requantized_blocks(tr, self.out_pool.take):
                assert out.rows is not None
                if out.scale is not None:
                    self._submit(st, functools.partial(self._write_named, st, scale, out.scale))
                    self._progress(m, out.scale.numel() * out.scale.element_size())
                self._submit(st, functools.partial(self._write_named, st, m.t.name, out.rows),
                             functools.partial(self.out_pool.give, buf))
                self._progress(m, out.rows.numel())
        except CheckpointError:
            raise  # the base: every output is affected
        except Exception as e:
            self._fail(st, e, on_lane=False)
            self._live(m.out)
            return
        for name in (m.t.name, scale):
            self._submit(st, functools.partial(st.tensor_done, name))

    @staticmethod
    def _write_named(st: OutputState, name: str, rows: torch.Tensor) -> None:
        st.writer(st.shard_of[name]).write(name, rows)

    def _write(self, m: Member, rows: torch.Tensor) -> None:
        st = self.states[m.out]
        st.writer(st.shard_of[m.t.name]).write(m.t.name, rows)

    def _tensor_done(self, m: Member) -> None:
        if m.overflow:
            raise f16_overflow_error(m.t.name, m.overflow[0], m.overflow[1])
        self.states[m.out].tensor_done(m.t.name)
        if m.t.quant is not None and m.t.quant.requant is not None:
            self.states[m.out].tensor_done(m.t.quant.requant.scale.name)

    def _copy(self, raws: list[Member]) -> None:
        """Untouched tensors: raw byte copies, chunk by chunk, every output copying a chunk before the next."""
        info = raws[0].t.base
        assert info is not None
        rows = max(1, RAW_CHUNK // max(1, info.row_nbytes))
        for r0 in range(0, info.rows if info.nbytes else 0, rows):
            r1 = min(info.rows, r0 + rows)
            live = [m for m in raws if self._live(m.out)]
            done = Countdown(len(live), functools.partial(self.reader.release, info, r0, r1))
            begin, nbytes = r0 * info.row_nbytes, (r1 - r0) * info.row_nbytes if info.shape else info.nbytes
            for m in live:
                st = self.states[m.out]

                def copy(m: Member = m, st: OutputState = st, begin: int = begin, nbytes: int = nbytes) -> None:
                    try:
                        with self.reader.opened(info.path, info.stamp) as fd:
                            st.writer(st.shard_of[m.t.name]).copy_from(m.t.name, fd, info.offset + begin, nbytes)
                    except CheckpointError:
                        self.reader.check(info)  # a source that ended early: name the file that changed
                        raise
                    self.reader.check(info)  # a file rewritten in place during the copy has a new mtime

                self._submit(st, copy, done.tick)
                self._progress(m, nbytes)
        for m in raws:
            if self._live(m.out):
                self._submit(self.states[m.out], functools.partial(self._tensor_done, m))


def _whole_tensor_requant(t: OutTensor) -> bool:
    return t.quant is not None and t.quant.requant is not None and t.quant.requant.whole_tensor


class _SourceError(Exception):
    """A base tensor could not be read: not one output's failure but every output's."""

    def __init__(self, error: CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error
