"""Many jobs on one base in one pass: every base row block is read once and merged into each job's output.

`merge_many(spec)` takes a parsed job file (`jobs.BatchSpec`) and returns one `JobResult` per job, in order. Each
job is planned, locked and staged like a single merge, and its output is byte-identical to `streammerge.merge` of
the same adapter with the same options. A job that fails (a plan problem, a full disk, a NaN) is reported with its
exit code and leaves nothing at its output; the other jobs go on. Memory does not grow with the number of jobs:
the block buffers are shared, and the adapter factors held at once are bounded (engine/stream.py).

A pure function of its arguments (no global state besides torch's thread setting, restored on return), so it
can run as a task of a distributed scheduler.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, load_adapter
from .api import MergeSummary, expect_shards, output_side_files, write_rest
from .engine import one_torch_thread
from .engine.stream import Output, run_pass
from .errors import Interrupted, OutputError, StreamMergeError, one_line
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.hub import resolve
from .io.output import check_free_space, check_output, resolve_output
from .io.sharding import PlannedTensor, plan_shards, shard_file_names
from .io.staging import Staging
from .jobs import BatchSpec, JobResult
from .lineage import base_mismatch
from .memory import MemoryMonitor
from .options import OUT_DTYPES, block_bytes, check_threads, parse_size
from .plan import Plan, build_plan
from .plan.combine import AdapterSet, check_weights, is_combination, plan_combination

Log = Callable[[str], None]


def plan_job(ckpt: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None, *, dtype: str,
             loader: str) -> tuple[Plan, Adapter]:
    """The plan of one job and the adapter its operations read: one adapter matched to the base, or a weighted
    combination planned as `streammerge.merge` plans it."""
    if is_combination(len(adapters), weights):
        combined = AdapterSet.of(adapters)
        return plan_combination(ckpt, combined, weights, dtype=dtype, loader=loader), combined
    return build_plan(ckpt, adapters[0], dtype=dtype, loader=loader), adapters[0]


@dataclass
class _Job:
    """A job that planned: everything its output needs, and its part of the pass."""

    result: JobResult
    output: Path
    base_dir: Path
    adapter_dirs: list[Path]
    weights: list[float] | None
    lora: Adapter
    plan: Plan
    shards: list[list[PlannedTensor]]
    names: list[str]
    extra: dict[str, Path]
    staging: Staging
    out: Output | None = None


def merge_many(spec: BatchSpec, *, threads: int | None = None, progress: bool = False, hf_token: str | None = None,
               log: Log | None = None) -> list[JobResult]:
    """Merge every job of `spec` into the base in one pass; one `JobResult` per job, in order.

    Options come from `spec.options` (those of `streammerge.merge`); `threads` overrides its `threads`. Only an
    interrupt (Interrupted, with every output cleaned up) or a bad option (ValueError) is raised; every other
    failure is its job's result.
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    opts = dict(spec.options)
    dtype = str(opts.get("dtype", "bf16"))
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")
    threads = check_threads(threads if threads is not None else opts.get("threads"))
    shard_limit = parse_size(opts.get("max_shard_size", "5GB"))
    block = block_bytes(opts.get("max_memory"))
    results = [JobResult(job, ok=False) for job in spec.jobs]
    try:
        _run(spec, results, dtype, threads, shard_limit, block, opts, progress, hf_token, say)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no job's output was written (their staging folders were removed)") from None
    for r in results:
        if r.summary is not None:
            r.summary.seconds = time.perf_counter() - started
    return results


def _run(spec: BatchSpec, results: list[JobResult], dtype: str, threads: int, shard_limit: int, block: int,
         opts: Mapping[str, Any], progress: bool, hf_token: str | None, say: Log) -> None:
    with MemoryMonitor() as mem, contextlib.ExitStack() as stack:
        try:
            base_dir = resolve(spec.base, "base", hf_token)
            ckpt = open_checkpoint(base_dir)
        except Exception as e:
            for r in results:
                _failed(r, e)
            return
        jobs: list[_Job] = []
        claimed: dict[int, int] = {}  # bytes promised on each file system by the jobs before
        for r in results:
            try:
                jobs.append(_prepare(r, spec, base_dir, ckpt, opts, shard_limit, claimed, stack, hf_token, say))
            except Exception as e:
                _failed(r, e)
        if jobs:
            say(f"[2/3] Merge: {len(jobs)} job(s) in one pass over {base_dir}")
            try:
                with one_torch_thread():
                    _pass(jobs, block, threads, progress, mem, bool(opts.get("clamp_f16", False)))
            except Exception as e:  # every job reads the base: a base that changed fails them all
                for j in jobs:
                    j.out = j.out or Output(j.plan, j.shards, j.names, j.staging.path, j.lora)
                    j.out.error = j.out.error or e
        for j in jobs:
            _finish(j, dtype, say, stack)
        mem.current()
        for r in results:
            if r.summary is not None:
                r.summary.peak_memory = mem.peak


def _prepare(r: JobResult, spec: BatchSpec, base_dir: Path, ckpt: Checkpoint, opts: Mapping[str, Any],
             shard_limit: int, claimed: dict[int, int], stack: contextlib.ExitStack, hf_token: str | None,
             say: Log) -> _Job:
    """Plan one job and take its output (lock, staging folder); raises what stops it."""
    job = r.job
    overwrite = bool(opts.get("overwrite", False))
    output = resolve_output(job.output)
    check_output(output, overwrite)
    adapter_dirs = [resolve(a, "adapter", hf_token) for a in job.adapters]
    combination = is_combination(len(adapter_dirs), job.weights)
    extra = output_side_files(base_dir, adapter_dirs, job.weights)
    check_output(output, overwrite, (base_dir, *adapter_dirs), writes=extra)
    adapters = [load_adapter(d) for d in adapter_dirs]
    for a in adapters:
        stack.callback(a.close)
    weights = list(check_weights(len(adapters), job.weights)) if combination else None
    plan, lora = plan_job(ckpt, adapters, weights, dtype=str(opts.get("dtype", "bf16")),
                          loader=str(opts.get("loader", "auto")))
    for a in adapters:
        mismatch = base_mismatch(a.config.raw.get("base_model_name_or_path"), spec.base, base_dir)
        if mismatch:
            warnings.warn(f"{a.config.path}: {mismatch}", stacklevel=3)
    shards = plan_shards([PlannedTensor(t.name, t.dtype, t.shape) for t in plan.tensors], shard_limit, plan.glued)
    names = shard_file_names(len(shards))
    needed = plan.total_bytes + sum(p.stat().st_size for p in extra.values())
    disk = _device(output)
    try:
        check_free_space(output, needed + claimed.get(disk, 0))
    except OutputError as e:
        if claimed.get(disk):
            raise OutputError(f"{e} (counting the jobs before it that write to the same disk)") from None
        raise
    claimed[disk] = claimed.get(disk, 0) + needed
    staging = stack.enter_context(Staging(output, overwrite))
    expect_shards(staging, shards, names)
    say(f"      {job.label}: layout {plan.layout}, {len(plan.merged)} merged tensors, {len(shards)} shard(s)")
    return _Job(r, output, base_dir, adapter_dirs, weights, lora, plan, shards, names, extra, staging)


def _pass(jobs: list[_Job], block: int, threads: int, progress: bool, mem: MemoryMonitor, clamp_f16: bool) -> None:
    for j in jobs:
        j.out = Output(j.plan, j.shards, j.names, j.staging.path, j.lora, clamp_f16)
    run_pass([j.out for j in jobs if j.out is not None], block, threads, progress, mem, any_order=True)


def _finish(j: _Job, dtype: str, say: Log, stack: contextlib.ExitStack) -> None:
    """Index, config and side files, then the commit; or, for a job that failed, its staging folder removed."""
    assert j.out is not None
    try:
        if j.out.error is not None:
            raise j.out.error
        write_rest(j.staging, j.plan, j.shards, j.names, j.extra, dtype)
        j.staging.commit()
        j.result.ok = True
        j.result.summary = MergeSummary(
            output=j.output, base=j.base_dir, adapter=j.adapter_dirs[0], layout=j.plan.layout,
            plan=j.plan.tensors, shards=j.names, tensors_merged=len(j.plan.merged),
            tensors_copied=len(j.plan.tensors) - len(j.plan.merged), bytes_written=j.out.written, seconds=0.0,
            peak_memory=0, files_copied=sorted(j.extra), notes=j.plan.notes, adapters=j.adapter_dirs,
            weights=j.weights, requantized=j.plan.requantized,
        )
        say(f"      {j.result.job.label}: done, {j.output}")
    except Exception as e:
        _failed(j.result, e)
        say(f"      {j.result.job.label}: failed (exit {j.result.exit_code})")
    finally:
        j.staging.__exit__(None, None, None)  # removes what is left of its staging folder and frees the lock


def _failed(r: JobResult, e: BaseException) -> None:
    r.ok, r.summary = False, None
    if isinstance(e, StreamMergeError):
        r.exit_code, r.error = e.exit_code, one_line(str(e))
    elif isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        r.exit_code, r.error = 6, f"{where}{e.strerror or e}; check the disk and the paths given"
    else:
        r.exit_code, r.error = 1, f"internal error {type(e).__name__}: {e} (a streammerge bug: please report it)"


def _device(output: Path) -> int:
    """The file system the output's staging folder will be on."""
    path = output.absolute().parent
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev
