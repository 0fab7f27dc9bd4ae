"""The merge: resolve inputs, plan, then stream every output tensor into new shards.

I/O stays at this edge; the math is in kernels.py and the decisions are in plan.py.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels
from .adapter import Adapter, load_adapter
from .checkpoint import DTYPES, TensorReader, open_checkpoint
from .errors import CheckpointError, NumericError
from .files import DTYPE_NAMES, copy_side_files, side_files, write_config
from .hub import resolve
from .lineage import base_mismatch
from .memory import MemoryMonitor, fmt_bytes
from .pipeline import BufferPool, WriteBehind
from .output import Staging, check_free_space, check_output, resolve_output
from .plan import (
    OUT_DTYPES, VERA_SHARED, BiasAdd, DoraCols, DoraRows, Ia3Scale, LohaRows, LokrRows, LoraCols, LoraExperts,
    LoraRows, OutTensor, Plan, TokenRows, VeraRows, build_plan,
)
from .writer import (
    DEFAULT_METADATA, PlannedTensor, ShardWriter, header_bytes, parse_size, plan_shards, shard_file_names, write_index,
)

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_BLOCK_BYTES = 4 * 2**20  # float32 row blocks of ~4 MiB stay in L2/L3; whole-tensor math is ~6x slower
F16_MAX = 65504.0

Log = Callable[[str], None]


@dataclass
class MergeSummary:
    """What a merge did (or, for a dry run, would do)."""

    output: Path
    base: Path
    adapter: Path
    layout: str
    plan: list[OutTensor]
    shards: list[str]
    tensors_merged: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    peak_memory: int
    files_copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False


def merge(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str = "bf16",
    loader: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    hf_token: str | None = None,
    progress: bool = False,
    max_memory: str | int | None = None,
    clamp_f16: bool = False,
    log: Log | None = None,
) -> MergeSummary:
    """Merge a PEFT LoRA adapter into a safetensors checkpoint, tensor by tensor, into `output`.

    `base` and `adapter` are local folders or Hugging Face repo ids. `dtype` is "bf16", "f16", "f32" or
    "auto" (keep each tensor's dtype). Nothing is written when `dry_run` is set or when planning finds a
    problem; the output appears at `output` only when complete.
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")
    shard_limit = parse_size(max_shard_size)
    block_bytes = _block_bytes(max_memory)
    output = Path(output).expanduser() if dry_run else resolve_output(output)
    staging = Staging(output, overwrite)  # nothing happens on disk until it is entered

    with staging.reporting_interrupts(), MemoryMonitor() as mem:
        if not dry_run:
            check_output(output, overwrite)
        base_dir = resolve(base, "base", hf_token)
        adapter_dir = resolve(adapter, "adapter", hf_token)
        if not dry_run:
            check_output(output, overwrite, (base_dir, adapter_dir), writes=side_files(base_dir, adapter_dir))

        say("[1/3] Plan: reading headers and matching the adapter to the base")
        ckpt = open_checkpoint(base_dir)
        lora = load_adapter(adapter_dir)
        try:
            plan = build_plan(ckpt, lora, dtype=dtype, loader=loader)
            mismatch = base_mismatch(lora.config.raw.get("base_model_name_or_path"), base, base_dir)
            if mismatch:
                warnings.warn(f"{lora.config.path}: {mismatch}", stacklevel=2)
            shards = plan_shards([PlannedTensor(t.name, t.dtype, t.shape) for t in plan.tensors], shard_limit)
            names = shard_file_names(len(shards))
            merged = plan.merged
            say(f"      layout {plan.layout}: {plan.adapter_keys} adapter tensors -> {len(merged)} merged tensors; "
                f"{len(plan.tensors)} tensors in {len(shards)} shard(s), {fmt_bytes(plan.total_bytes)}")
            for note in plan.notes:
                say(f"      note: {note}")
            extra = side_files(base_dir, adapter_dir)
            summary = MergeSummary(
                output=output, base=base_dir, adapter=adapter_dir, layout=plan.layout, plan=plan.tensors,
                shards=names, tensors_merged=len(merged), tensors_copied=len(plan.tensors) - len(merged),
                bytes_written=0, seconds=0.0, peak_memory=0, files_copied=sorted(extra), notes=plan.notes,
                dry_run=dry_run,
            )
            if dry_run:
                for t in merged:
                    say(f"      {t.name} {list(t.shape)} {t.dtype}: {t.describe()}")
                say("      dry run: nothing written")
            else:
                check_free_space(output, plan.total_bytes + sum(p.stat().st_size for p in extra.values()))
                with staging, one_torch_thread():
                    say(f"[2/3] Merge: writing {len(shards)} shard(s)")
                    for shard, name in zip(shards, names):
                        size = len(header_bytes(shard, DEFAULT_METADATA)[0]) + sum(t.nbytes for t in shard)
                        staging.expect(name, size)
                    written = _write_shards(plan, shards, names, staging.path, lora, block_bytes, progress, mem,
                                             clamp_f16)
                    others = len([f for f in extra if f != "config.json"])
                    say(f"[3/3] Write: index, config.json and {others} other file(s) (tokenizer, templates, code)")
                    if len(shards) > 1:
                        write_index(staging.path / INDEX_NAME, shards, names)
                        staging.expect(INDEX_NAME)
                    copy_side_files(extra, staging.path)
                    _write_output_config(plan, extra.get("config.json"), staging.path, dtype)
                    for rel in extra:
                        staging.expect(rel)
                    staging.commit()
                summary.bytes_written = written
        finally:
            lora.close()
        mem.current()
        summary.seconds = time.perf_counter() - started
        summary.peak_memory = mem.peak  # inside the block: an interrupt from here on is still reported truly
    return summary


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


def _block_bytes(max_memory: str | int | None) -> int:
    if max_memory is None:
        return DEFAULT_BLOCK_BYTES
    budget = parse_size(max_memory)
    # a float32 block lives ~3 times at once (source upcast, delta, output cast): keep that well inside the budget
    return max(64 * 1024, min(DEFAULT_BLOCK_BYTES, budget // 16))


def _write_output_config(plan: Plan, src: Path | None, dest: Path, dtype: str) -> None:
    out_dtype = OUT_DTYPES[dtype]
    write_config(src, dest / "config.json", DTYPE_NAMES.get(out_dtype) if out_dtype else None, plan.config_updates)


def _write_shards(plan: Plan, shards, names, dest: Path, lora: Adapter, block_bytes: int, progress: bool,
                  mem: MemoryMonitor, clamp_f16: bool) -> int:
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
                writer = ShardWriter(dest / name, shard, writeback=True)
                writers.append(writer)
                order = [by_name[p.name] for p in writer.order]
                for i, t in enumerate(order):
                    if i + 1 < len(order) and order[i + 1].base is not None:
                        reader.prefetch(order[i + 1].base)
                    if bar is not None:
                        bar.set_postfix_str(f"{t.name[-40:]} | RAM {fmt_bytes(mem.current())}", refresh=False)
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
          sink: WriteBehind, pool: BufferPool, bar, clamp_f16: bool = False) -> int:
    """Queue one output tensor: a raw byte copy, or row blocks computed in float32 and rounded once."""
    if t.raw_copy:
        info = t.base

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
    from_base = t.base is not None and t.replacement is None
    for r0, r1, y, buf in merged_rows(t, reader, lora, block_bytes, clamp_f16, take=pool.take):

        def write(y: torch.Tensor = y, r0: int = r0, r1: int = r1) -> None:
            writer.write(t.name, y)
            if from_base:
                # the rows are in `y`: their source pages can go (on this thread, which has slack; the main
                # thread's math is the critical path)
                reader.release(t.base, r0, r1)

        sink.submit(write, buf)
        n = y.numel() * y.element_size()
        total += n
        if bar is not None:
            bar.update(n)
    return total


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def merged_rows(
    t: OutTensor, reader: TensorReader, lora: Adapter, block_bytes: int = DEFAULT_BLOCK_BYTES,
    clamp_f16: bool = False, blocks: Callable[[int, int], bool] | None = None,
    take: Callable[[int], torch.Tensor] = _new_buffer,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield `(r0, r1, rows, buffer)`: rows of the output tensor in the output dtype as a 2-D `[rows, cols]`
    view into `buffer` (a byte buffer from `take(nbytes)`, which the caller owns from then on).

    `blocks(r0, r1)` may skip blocks (verify samples rows); a DoRA column norm still reads every row.
    """
    rows = t.shape[0] if t.shape else 1
    cols = math.prod(t.shape[1:]) if t.shape else 1
    out_dtype = DTYPES[t.dtype]
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    # source rows are read (pread, never mapped: a file truncated meanwhile is an error, not SIGBUS) into
    # buffers reused by every block; the base's next block is read ahead while this one is computed
    if t.replacement is not None:
        key = t.replacement
        src_buf = reader.buffer(min(rows, _block_rows(block_bytes, cols)) * cols * lora.dtypes[key].itemsize)

        def source(r0: int, r1: int) -> torch.Tensor:
            return lora.read_rows(key, r0, r1, src_buf).reshape(r1 - r0, cols)
    else:
        info = t.base

        def source(r0: int, r1: int) -> torch.Tensor:
            return reader.next_rows(info, r0, r1).reshape(r1 - r0, cols)

    ops = [_Prepared(op, lora) for op in t.ops]
    step = _block_rows(block_bytes, cols)
    # float32 scratch reused by every block of this tensor: no allocation (and no page faults) per block
    # half <-> half casts (bf16 -> f16) run ~3x faster on the CPU through float32 than directly
    half = (torch.float16, torch.bfloat16)
    src_dtype = lora.dtypes[t.replacement] if t.replacement is not None else t.base.torch_dtype
    via_f32 = not ops and src_dtype in half and out_dtype in half and src_dtype != out_dtype
    scratch = torch.empty(min(step, rows) * cols, dtype=torch.float32) if ops or via_f32 else None
    tmp = torch.empty_like(scratch) if ops and any(isinstance(p.op, (LoraRows, VeraRows)) for p in ops) else None

    def compute(r0: int, r1: int, src: torch.Tensor) -> torch.Tensor:
        w = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
        w.copy_(src)
        t_block = tmp[: (r1 - r0) * cols].view(r1 - r0, cols) if tmp is not None else None
        for p in ops:
            p.apply(w, r0, r1, col_norms, t_block)
        return w

    col_norms = None
    if any(isinstance(p.op, DoraCols) for p in ops):
        # the norm runs over every row, so it needs its own pass before any row can be written
        before = ops[: next(i for i, p in enumerate(ops) if isinstance(p.op, DoraCols))]
        col_sq = torch.zeros(cols, dtype=torch.float64)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
            w.copy_(source(r0, r1))
            for p in before:
                p.apply(w, r0, r1, None, None)
            col_sq += kernels.column_sq_norms(w).double()
        col_norms = col_sq.sqrt().float()

    overflow: list[int] = []  # [count, first row] once float16 overflow was seen: count it all, then refuse
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if blocks is not None and not blocks(r0, r1):
            continue
        src = source(r0, r1)
        if ops:
            w = compute(r0, r1, src)
        elif via_f32:
            w = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
            w.copy_(src)
        else:
            w = src
        if ops and not kernels.all_finite(w):
            bad = kernels.nonfinite_count(w)
            origin = "the base tensor already has NaN/Inf values" if kernels.nonfinite_count(src) else \
                "the adapter's delta made them"
            raise NumericError(f"{t.name}: {bad} NaN/Inf values in the merged rows {r0}..{r1 - 1} ({origin}); "
                               "check the base and adapter files")
        if out_dtype == torch.float16 and w.dtype != torch.float16:
            count, first = _f16_overflow(w)
            if count and not clamp_f16:
                overflow = overflow or [0, r0 + first]
                overflow[0] += count
            elif count:
                w = w.clamp(-F16_MAX, F16_MAX)
        if overflow:
            continue
        nbytes = (r1 - r0) * cols * itemsize
        buf = take(nbytes)
        y = buf[:nbytes].view(out_dtype).view(r1 - r0, cols)
        y.copy_(w)
        yield r0, r1, y, buf
    if overflow:
        raise NumericError(f"{t.name}: {overflow[0]} values exceed the float16 range (first in row {overflow[1]}); "
                           "use --dtype bf16 or f32, or pass --clamp-f16 to clamp them to +-65504")


def _block_rows(block_bytes: int, cols: int) -> int:
    """Rows per block: whole tiles, so the merged bytes do not depend on the block size."""
    tile = kernels.tile_rows(cols)
    return max(tile, block_bytes // (max(cols, 1) * 4) // tile * tile)


def _f16_overflow(w: torch.Tensor) -> tuple[int, int]:
    """(how many finite values of `w` exceed float16's range, the first such row)."""
    if w.numel() == 0:
        return 0, -1
    lo, hi = torch.aminmax(w)
    if -F16_MAX <= lo and hi <= F16_MAX:  # one pass for the common case (NaN fails both and is counted below)
        return 0, -1
    over = (w.abs() > F16_MAX) & torch.isfinite(w)
    if not bool(over.any()):
        return 0, -1
    return int(over.sum()), int(over.reshape(w.shape[0], -1).any(dim=1).nonzero()[0][0])


class _Prepared:
    """An op with its adapter tensors loaded once as float32 (they are small: rank x dim)."""

    def __init__(self, op, lora: Adapter) -> None:
        self.op = op
        if isinstance(op, (LoraRows, LoraCols, LoraExperts)):
            a, b = lora.factor(op.a), lora.factor(op.b)
            if isinstance(op, LoraRows):
                if op.expert is not None:
                    # one expert of fused factors: A rows grouped by expert, B columns interleaved (spec §12)
                    r = a.shape[0] // op.experts
                    a = a[op.expert * r:(op.expert + 1) * r]
                    b = b[:, op.expert::op.experts]
                if op.b_rows is not None:
                    b = b[op.b_rows[0]:op.b_rows[1]]
                self.a, self.b = a.flatten(1), b.flatten(1).contiguous()  # flatten: a 0-row B is fine
            else:
                self.a, self.b = a, b
        elif isinstance(op, TokenRows):
            values = lora.factor(op.key).to(DTYPES[op.base_dtype]).float()
            self.indices = torch.tensor(op.indices, dtype=torch.long)
            self.values = values
        elif isinstance(op, (BiasAdd, DoraRows, DoraCols, Ia3Scale)):
            self.v = lora.factor(op.key).reshape(-1)
        elif isinstance(op, LohaRows):
            self.w1a, self.w1b, self.w2a, self.w2b = (lora.factor(k) for k in (op.w1a, op.w1b, op.w2a, op.w2b))
        elif isinstance(op, LokrRows):
            w1, w2 = ([lora.factor(k) for k in keys] for keys in (op.w1, op.w2))
            self.w1 = w1[0] if len(w1) == 1 else w1[0] @ w1[1]
            self.w2 = w2[0] if len(w2) == 1 else w2[0] @ w2[1]
        elif isinstance(op, VeraRows):
            a, b = lora.factor(VERA_SHARED[0]), lora.factor(VERA_SHARED[1])
            lambda_b, lambda_d = lora.factor(op.lambda_b), lora.factor(op.lambda_d)
            # exactly PEFT's factors: (lambda_b * B[:out]) and (lambda_d * A[:, :in]), rounded in float32
            out_dim = lambda_b.shape[0]
            self.b = lambda_b.unsqueeze(-1) * b[:out_dim]
            self.a_full = lambda_d.unsqueeze(-1) * a

    def apply(self, w: torch.Tensor, r0: int, r1: int, col_norms: torch.Tensor | None,
              tmp: torch.Tensor | None) -> None:
        op = self.op
        if isinstance(op, LoraRows) and op.out_rows is not None:
            kernels.add_lora_rows_at(w, r0, self.a, self.b, op.out_rows, op.scale)
        elif isinstance(op, LoraRows):
            kernels.add_lora_rows(w, self.a, self.b[r0:r1], op.scale, tmp)
        elif isinstance(op, LoraExperts):
            r = self.a.shape[0] // op.experts
            for e in range(r0, r1):
                kernels.add_expert_delta(w[e - r0], self.a[e * r:(e + 1) * r], self.b[:, e::op.experts], op.scale,
                                         op.transpose)
        elif isinstance(op, LoraCols):
            kernels.add_lora_cols(w, self.a[:, r0:r1], self.b, op.scale)
        elif isinstance(op, BiasAdd):
            kernels.add_scaled(w, self.v[r0:r1].reshape(-1, 1), op.scale)
        elif isinstance(op, TokenRows):
            sel = (self.indices >= r0) & (self.indices < r1)
            if bool(sel.any()):
                kernels.replace_rows(w, self.indices[sel] - r0, self.values[sel])
        elif isinstance(op, DoraRows):
            kernels.dora_rows(w, self.v[r0:r1])
        elif isinstance(op, DoraCols):
            if col_norms is not None:
                kernels.dora_cols(w, self.v, col_norms)
        elif isinstance(op, LohaRows):
            kernels.add_hadamard_rows(w, self.w1a[r0:r1], self.w1b, self.w2a[r0:r1], self.w2b, op.scale)
        elif isinstance(op, LokrRows):
            kernels.add_kron_rows(w, self.w1, self.w2, r0, r1, op.scale)
        elif isinstance(op, Ia3Scale):
            kernels.scale_rows(w, self.v[r0:r1]) if op.axis == "rows" else kernels.scale_cols(w, self.v)
        elif isinstance(op, VeraRows):
            if op.transpose:  # Conv1D [in, out]: rows are inputs
                kernels.add_lora_cols(w, self.a_full[:, r0:r1], self.b, 1.0)
            else:
                kernels.add_lora_rows(w, self.a_full[:, : w.shape[1]], self.b[r0:r1], 1.0, tmp)
