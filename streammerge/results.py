"""Machine-readable results (`--json`): one JSON object per merge, verify or batch job, with a fixed set of keys.

Every record has `command`, `ok`, `exit_code` and `error` (null, or `{"type", "message", "exit_code"}`); the
other keys depend on the command and are present (null when unknown, e.g. after an early failure) whether the
command succeeded or not, so a pipeline can read them without checking which exist.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import MergeSummary
    from .io.quant import RequantReport
    from .jobs import JobResult
    from .verify import VerifyReport

MERGE_KEYS = ("base", "adapters", "weights", "output", "dtype", "dry_run", "layout", "shards", "tensors_merged",
              "tensors_copied", "bytes_written", "seconds", "peak_memory", "files_copied", "notes", "warnings",
              "requantized", "verify")
VERIFY_KEYS = ("base", "adapters", "weights", "merged", "ok_values", "tensors_checked", "rows_checked", "rows",
               "max_ulps", "worst_tensor", "off_rounded", "dtype_choices", "problems", "seconds", "warnings")


def error_kind(code: int) -> str:
    """The error class a job's exit code stands for (a job run elsewhere reports its code and message)."""
    from . import errors

    kinds = {c.exit_code: c.__name__ for c in (errors.InputError, errors.PlanError, errors.UnsupportedError,
                                               errors.OutputError, errors.NumericError, errors.HubError,
                                               errors.VerifyError, errors.ClusterError)}
    kinds.update({1: "InternalError", 130: "Interrupted"})
    return kinds.get(code, "Error")


def new_record(command: str, keys: Sequence[str], **known: Any) -> dict[str, Any]:
    """A record with every key of its command, null until filled."""
    record: dict[str, Any] = {"command": command, "ok": False, "exit_code": None}
    record.update(dict.fromkeys(keys))
    record.update({k: _plain(v) for k, v in known.items()})
    record["error"] = None
    return record


def summary_fields(summary: MergeSummary) -> dict[str, Any]:
    """What a merge (or dry run) did, from its MergeSummary."""
    return {
        "base": str(summary.base),
        "adapters": [str(a) for a in (summary.adapters or [summary.adapter])],
        "weights": summary.weights,
        "output": str(summary.output),
        "dry_run": summary.dry_run,
        "layout": summary.layout,
        "shards": list(summary.shards),
        "tensors_merged": summary.tensors_merged,
        "tensors_copied": summary.tensors_copied,
        "bytes_written": summary.bytes_written,
        "seconds": round(summary.seconds, 3),
        "peak_memory": summary.peak_memory,
        "files_copied": list(summary.files_copied),
        "notes": list(summary.notes),
        "requantized": [{"tensor": r.name, "max_abs_error": r.max_abs, "mean_abs_error": r.mean_abs,
                         "max_abs_value": r.max_value} for r in summary.requantized],
    }


REQUANT_SHOWN = 8  # tensors listed one by one; more are summarised


def requant_lines(reports: Sequence[RequantReport]) -> list[str]:
    """How far re-quantization (--dtype keep) moved each merged tensor from its float32 merge: the largest ones."""
    if not reports:
        return []
    worst = max(reports, key=lambda r: r.max_abs)
    mean = sum(r.sum_abs for r in reports) / max(1, sum(r.count for r in reports))
    lines = [f"Requant : {len(reports)} merged tensor(s) re-quantized; error against the float32 merge: max "
             f"{worst.max_abs:.3g} (in {worst.name}), mean {mean:.3g}"]
    shown = sorted(reports, key=lambda r: -r.max_abs)[:REQUANT_SHOWN]
    for r in shown:
        rel = f" ({r.max_abs / r.max_value:.2%} of its largest value)" if r.max_value else ""
        lines.append(f"          {r.name}: max {r.max_abs:.3g}{rel}, mean {r.mean_abs:.3g}")
    if len(reports) > len(shown):
        lines.append(f"          ... and {len(reports) - len(shown)} more (MergeSummary.requantized has them all)")
    return lines


def verify_fields(report: VerifyReport) -> dict[str, Any]:
    """What a verify run found (`ok_values`: every checked value and file matched)."""
    worst = report.worst
    return {
        "ok_values": report.ok,
        "tensors_checked": len(report.checks),
        "rows_checked": sum(c.rows_checked for c in report.checks),
        "rows": sum(c.rows for c in report.checks),
        "max_ulps": worst.max_ulps if worst else 0,
        "worst_tensor": worst.name if worst and worst.max_ulps else None,
        "off_rounded": sum(c.off_rounded for c in report.checks),
        "dtype_choices": list(report.dtype_choices),
        "problems": report.problems(),
    }


def set_error(record: dict[str, Any], code: int, message: str, kind: str) -> dict[str, Any]:
    record.update(ok=False, exit_code=code, error={"type": kind, "message": message, "exit_code": code})
    return record


def job_record(result: JobResult, index: int, total: int, spec_base: str, options: dict[str, Any]) -> dict[str, Any]:
    """One batch job's record: the merge record of its output plus the job's name, position and attempts."""
    job = result.job
    record = new_record("batch", MERGE_KEYS, base=spec_base, adapters=list(job.adapters),
                        weights=list(job.weights) if job.weights is not None else None, output=job.output,
                        dtype=options.get("dtype", "bf16"), dry_run=False)
    record.update(job=job.label, index=index, jobs=total, attempts=result.attempts, node=None)
    if result.summary is not None:
        if isinstance(result.summary, dict):  # a record already (from a task on another machine)
            record.update({k: v for k, v in result.summary.items() if k in record and k not in ("command", "error")})
        else:
            record.update(summary_fields(result.summary))
    if result.ok:
        record.update(ok=True, exit_code=0)
    else:
        kind = getattr(result, "error_type", None) or error_kind(result.exit_code)
        set_error(record, result.exit_code, result.error or "failed", kind)
    return record


def dumps(record: dict[str, Any]) -> str:
    """One line of JSON (non-ASCII kept as is; the caller escapes what its stream cannot show)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=False, default=str)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
