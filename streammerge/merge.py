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
from .options import OUT_DTYPES, parse_size
from .plan import OutTensor, Plan, build_plan
from .tuners.base import Block
from .writer import DEFAULT_METADATA, PlannedTensor, ShardWriter, header_bytes, plan_shards, shard_file_names, write_index

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

    ops = [op.prepare(lora) for op in t.ops]
    step = _block_rows(block_bytes, cols)
    # float32 scratch reused by every block of this tensor: no allocation (and no page faults) per block
    # half <-> half casts (bf16 -> f16) run ~3x faster on the CPU through float32 than directly
    half = (torch.float16, torch.bfloat16)
    src_dtype = lora.dtypes[t.replacement] if t.replacement is not None else t.base.torch_dtype
    via_f32 = not ops and src_dtype in half and out_dtype in half and src_dtype != out_dtype
    scratch = torch.empty(min(step, rows) * cols, dtype=torch.float32) if ops or via_f32 else None
    tmp: list[torch.Tensor] = []  # a second float32 buffer for the ops that want one, made on first use

    def block(r0: int, r1: int) -> Block:
        def second() -> torch.Tensor:
            if not tmp:
                tmp.append(torch.empty_like(scratch))
            return tmp[0][: (r1 - r0) * cols].view(r1 - r0, cols)

        return Block(r0, r1, second)

    def compute(r0: int, r1: int, src: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        w = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
        w.copy_(src)
        b = block(r0, r1)
        for p in ops[:upto]:
            p.apply(w, b)
        return w

    for i, p in enumerate(ops):
        if p.prepass:
            # e.g. DoRA's column norms run over every row: a pass of their own before any row can be written
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                p.observe(compute(r0, r1, source(r0, r1), upto=i))

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
