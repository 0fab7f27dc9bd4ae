"""The public Python API: `merge()` resolves the inputs, plans, streams the shards and publishes the output.

The stages live elsewhere (io/ reads and writes files, plan/ decides, engine/ computes); this module only puts
them in order and reports what was done.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import Adapter
from .engine import one_torch_thread, write_shards
from .io.checkpoint import open_checkpoint
from .io.formats import DTYPE_NAMES, SAFETENSORS_INDEX_FILE
from .io.hub import resolve
from .io.journal import Journal, Resumable, open_journal
from .io.output import check_free_space, check_output, resolve_output
from .io.quant import RequantReport
from .io.sharding import (
    DEFAULT_METADATA,
    PlannedTensor,
    header_bytes,
    plan_shards,
    shard_file_names,
    write_index,
)
from .io.sidefiles import copy_side_files, side_files, write_config
from .io.staging import Staging
from .lineage import base_mismatch
from .memory import MemoryMonitor, fmt_bytes
from .options import OUT_DTYPES, block_bytes, check_threads, parse_size
from .plan import OutTensor, Plan
from .plan.combine import AdapterSet, check_weights, combined_side_files, is_combination, plan_adapters

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
    adapters: list[Path] = field(default_factory=list)   # every adapter (one, or a weighted combination's)
    weights: list[float] | None = None                   # the combination's weights
    # --dtype keep on a quantized base: how far re-quantization moved each merged tensor from its float32 merge
    requantized: list[RequantReport] = field(default_factory=list)


def merge(
    base: str | Path,
    adapter: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
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
    threads: int | None = None,
    resume: bool = False,
) -> MergeSummary:
    """Merge a PEFT LoRA adapter into a safetensors checkpoint, tensor by tensor, into `output`.

    `base` and `adapter` are local folders or Hugging Face repo ids. A list of adapters (or one adapter with
    `weights`) is merged as the weighted combination `W + Σ w_i s_i B_i A_i`, PEFT's
    `add_weighted_adapter(..., combination_type="cat")` (weights default to 1 each). `dtype` is "bf16", "f16",
    "f32", "auto" (keep each tensor's dtype) or "keep" (as auto, and a quantized base's quantization too: FP8 stays
    FP8, merged tensors re-quantized with fresh scales). A quantized base (FP8, compressed-tensors FP8, MXFP4,
    bitsandbytes) is read dequantized. `threads` compute row blocks at once (default: the cores this process may
    use); the output bytes are the same for any number. With `resume`, the shards a killed run of the same merge
    finished (and fsync'ed) in its staging folder are checked and reused (see io/journal.py). Nothing is written
    when `dry_run` is set or when planning finds a problem; the output appears at `output` only when complete.
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")
    sources = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    if not sources:
        raise ValueError("no adapter given")
    if is_combination(len(sources), weights):
        weights = list(check_weights(len(sources), weights))
    threads = check_threads(threads)
    shard_limit = parse_size(max_shard_size)
    block = block_bytes(max_memory)
    output = Path(output).expanduser() if dry_run else resolve_output(output)
    staging = Staging(output, overwrite, resume)  # nothing happens on disk until it is entered

    with staging.reporting_interrupts(), MemoryMonitor() as mem:
        if not dry_run:
            check_output(output, overwrite)
        base_dir = resolve(base, "base", hf_token)
        adapter_dirs = [resolve(a, "adapter", hf_token) for a in sources]
        adapter_dir = adapter_dirs[0]
        if not dry_run:
            check_output(output, overwrite, (base_dir, *adapter_dirs),
                         writes=output_side_files(base_dir, adapter_dirs, weights))

        say("[1/3] Plan: reading headers and matching the adapter to the base")
        ckpt = open_checkpoint(base_dir)
        plan, lora = plan_adapters(ckpt, adapter_dirs, weights, dtype=dtype, loader=loader)
        try:
            for member in lora.members if isinstance(lora, AdapterSet) else (lora,):
                _warn_lineage(member, base, base_dir)
            shards = plan_shards([PlannedTensor(t.name, t.dtype, t.shape) for t in plan.tensors], shard_limit,
                                 plan.glued)
            names = shard_file_names(len(shards))
            _say_plan(say, plan, len(shards), dry_run)
            extra = output_side_files(base_dir, adapter_dirs, weights)
            summary = MergeSummary(
                output=output, base=base_dir, adapter=adapter_dir, layout=plan.layout, plan=plan.tensors,
                shards=names, tensors_merged=len(plan.merged), tensors_copied=len(plan.tensors) - len(plan.merged),
                bytes_written=0, seconds=0.0, peak_memory=0, files_copied=sorted(extra), notes=plan.notes,
                dry_run=dry_run, adapters=adapter_dirs, weights=None if weights is None else list(weights),
            )
            if not dry_run:
                check_free_space(output, plan.total_bytes + sum(p.stat().st_size for p in extra.values()))
                with staging, one_torch_thread():
                    options = {"dtype": dtype, "loader": loader, "layout": plan.layout, "max_shard_size": shard_limit,
                               "block": block, "clamp_f16": clamp_f16, "weights": weights}
                    members = lora.members if isinstance(lora, AdapterSet) else (lora,)
                    journal = open_journal(staging, ckpt.files, [f for m in members for f in (m.config.path,
                                                                                              m.weights_path)],
                                           options, shards, names, say)
                    summary.bytes_written = _write(plan, shards, names, staging, lora, extra, dtype, block,
                                                   progress, mem, clamp_f16, say, threads, journal)
                    staging.commit()
                summary.requantized = plan.requantized
        finally:
            lora.close()
        mem.current()
        summary.seconds = time.perf_counter() - started
        summary.peak_memory = mem.peak  # inside the block: an interrupt from here on is still reported truly
    return summary


def output_side_files(base_dir: Path, adapter_dirs: list[Path], weights: Sequence[float] | None) -> dict[str, Path]:
    """The non-weight files the output gets (relative name -> source): of one adapter, or of a combination."""
    if is_combination(len(adapter_dirs), weights):
        return combined_side_files(base_dir, adapter_dirs)
    return side_files(base_dir, adapter_dirs[0])


def _warn_lineage(lora: Adapter, base: str | Path, base_dir: Path) -> None:
    mismatch = base_mismatch(lora.config.raw.get("base_model_name_or_path"), base, base_dir)
    if mismatch:
        warnings.warn(f"{lora.config.path}: {mismatch}", stacklevel=3)


def _say_plan(say: Log, plan: Plan, shards: int, dry_run: bool) -> None:
    merged = plan.merged
    say(f"      layout {plan.layout}: {plan.adapter_keys} adapter tensors -> {len(merged)} merged tensors; "
        f"{len(plan.tensors)} tensors in {shards} shard(s), {fmt_bytes(plan.total_bytes)}")
    for note in plan.notes:
        say(f"      note: {note}")
    if dry_run:
        for t in merged:
            say(f"      {t.name} {list(t.shape)} {t.dtype}: {t.describe()}")
        say("      dry run: nothing written")


def _write(plan: Plan, shards: list[list[PlannedTensor]], names: list[str], staging: Staging, lora: Adapter,
           extra: dict[str, Path], dtype: str, block: int, progress: bool, mem: MemoryMonitor, clamp_f16: bool,
           say: Log, threads: int, journal: tuple[Journal, Resumable]) -> int:
    """Everything the output holds, into the staging folder, each file announced to the commit's check."""
    say(f"[2/3] Merge: writing {len(shards)} shard(s)")
    expect_shards(staging, shards, names)
    written = write_shards(plan, shards, names, staging.path, lora, block, progress, mem, clamp_f16, threads,
                           *journal)
    others = len([f for f in extra if f != "config.json"])
    say(f"[3/3] Write: index, config.json and {others} other file(s) (tokenizer, templates, code)")
    write_rest(staging, plan, shards, names, extra, dtype)
    return written


def expect_shards(staging: Staging, shards: list[list[PlannedTensor]], names: list[str]) -> None:
    """Announce every planned shard, with its size, to the commit's completeness check."""
    for shard, name in zip(shards, names):
        staging.expect(name, len(header_bytes(shard, DEFAULT_METADATA)[0]) + sum(t.nbytes for t in shard))


def write_rest(staging: Staging, plan: Plan, shards: list[list[PlannedTensor]], names: list[str],
               extra: dict[str, Path], dtype: str) -> None:
    """The output's files besides its shards: the index (several shards), the side files, config.json for
    `dtype` and the plan's config updates; each announced to the commit's check."""
    if len(shards) > 1:
        write_index(staging.path / SAFETENSORS_INDEX_FILE, shards, names)
        staging.expect(SAFETENSORS_INDEX_FILE)
    copy_side_files(extra, staging.path)
    out_dtype = OUT_DTYPES[dtype]
    write_config(extra.get("config.json"), staging.path / "config.json",
                 DTYPE_NAMES.get(out_dtype) if out_dtype else None, plan.config_updates)
    for rel in extra:
        staging.expect(rel)
