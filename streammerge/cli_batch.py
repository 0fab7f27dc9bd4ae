"""`streammerge batch JOBS`: every job of a job file, a result line per job, the worst job's exit code.

Locally the jobs are merged in one pass over the base (`streammerge.batch.merge_many`); with --ray they run as
tasks on a Ray cluster (distributed.py), each a normal streaming merge.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .cli import _finished, _printer, _run
from .cli_args import Parser, check_sizes
from .cli_json import emit
from .jobs import BatchSpec, JobResult, Resources

DESCRIPTION = """\
Run every job of a job file: one base, one output per job, each an adapter or a weighted combination of adapters.

  {"base": "Qwen/Qwen3-1.7B", "dtype": "bf16",
   "jobs": [{"adapter": "./lora-a", "output": "./merged-a"},
            {"adapters": ["./lora-a", "./lora-b"], "weights": [0.7, 0.3], "output": "./merged-ab"}]}

The same as YAML (pip install 'streammerge[yaml]') or TOML ([[jobs]] tables). Top-level options (dtype, loader,
max_shard_size, max_memory, overwrite, clamp_f16) apply to every job; relative paths are relative to the job
file. A job's failure does not stop the others; each job gets a result line, and the exit code is the largest
of the jobs' exit codes (0 when every job succeeded).

With --ray the jobs run as Ray tasks on a cluster whose nodes see the same files (docs/distributed.md): each
task asks for one CPU (or `threads`) and the memory its adapters need, unless `resources` in the job file
({"num_cpus": 2, "memory": "8GB"}, top level or per job) or --cpus-per-job / --memory-per-job say otherwise.
A task lost with its worker or node is retried once; a job's own error is not.
"""

EPILOG = """examples:
  streammerge batch jobs.yaml
  streammerge batch jobs.json --json > results.jsonl
  streammerge batch jobs.toml --ray                       # a local Ray cluster (or $RAY_ADDRESS)
  streammerge batch jobs.toml --ray ray://head:10001 --memory-per-job 4GB
"""


def build_batch_parser() -> argparse.ArgumentParser:
    p = Parser(prog="streammerge batch", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", metavar="JOBS", help="job file (.json, .yaml/.yml or .toml)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the jobs as Ray tasks: on the cluster at ADDRESS ('auto', 'HOST:6379', "
                        "'ray://HOST:10001'), or without ADDRESS on $RAY_ADDRESS or a new local cluster")
    p.add_argument("--cpus-per-job", type=float, default=None, metavar="N",
                   help="with --ray: CPUs each job asks for (default: 1, or the job file's resources/threads)")
    p.add_argument("--memory-per-job", default=None, metavar="SIZE",
                   help="with --ray: memory each job asks for, e.g. 4GB (default: derived from its adapters)")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: $HF_TOKEN); never printed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per job (JSON lines, as each job ends) on stdout, everything else "
                        "on stderr")
    return p


def main_batch(argv: Sequence[str], process: bool = False) -> int:
    parser = build_batch_parser()
    args = parser.parse_args(list(argv))
    check_sizes(parser, {"--memory-per-job": args.memory_per_job})
    if args.cpus_per_job is not None and args.cpus_per_job <= 0:
        parser.error("argument --cpus-per-job: use a positive number")
    if args.ray is None and (args.cpus_per_job is not None or args.memory_per_job is not None):
        parser.error("--cpus-per-job and --memory-per-job only apply with --ray")
    token = args.hf_token or os.environ.get("HF_TOKEN") or None
    return _run(lambda: _batch(args, token), token, process, "interrupted; the jobs not reported above did not finish",
                on_error=_batch_error(args, token))


def _batch(args: argparse.Namespace, token: str | None) -> int:
    from .jobs import load_jobs

    say = _printer(token, sys.stderr)
    print = _printer(token, sys.stderr if args.json else sys.stdout)
    spec = load_jobs(args.jobs)
    total = len(spec.jobs)
    codes: list[int] = []

    def on_result(i: int, result: JobResult) -> None:
        codes.append(0 if result.ok else result.exit_code)
        if args.json:
            from .results import job_record

            emit(job_record(result, i, total, spec.base, dict(spec.options)), token)
        else:
            print(_result_line(i, total, result))
        if not result.ok:
            say(f"error: job {result.job.label}: {result.error}")

    say(f"Batch : {len(spec.jobs)} job(s) on base {spec.base}" + (" (Ray)" if args.ray is not None else ""))
    if args.ray is not None:
        from .distributed import run_on_ray
        from .options import parse_size

        flags = Resources(args.cpus_per_job, parse_size(args.memory_per_job) if args.memory_per_job else None)
        run_on_ray(spec, address=args.ray or None, hf_token=token, flags=flags, on_result=on_result, say=say)
    else:
        _run_locally(spec, token, on_result, progress=not args.no_progress and sys.stderr.isatty(), say=say)
    worst = max(codes, default=0)
    failed = sum(1 for c in codes if c)
    say(f"Batch : {total - failed} of {total} job(s) succeeded" + (f"; exit code {worst}" if worst else ""))
    _finished.set()
    return worst


def _run_locally(spec: BatchSpec, token: str | None, on_result: Any, progress: bool, say: Any) -> None:
    """Every job in one pass over the base (`streammerge.batch.merge_many`)."""
    from .batch import merge_many

    for i, result in enumerate(merge_many(spec, progress=progress, hf_token=token, log=say)):
        on_result(i, result)


def _result_line(i: int, total: int, result: JobResult) -> str:
    job = result.job
    head = f"[{i + 1}/{total}] {job.label}:"
    again = f" (attempt {result.attempts})" if result.attempts > 1 else ""
    if not result.ok:
        return f"{head} FAILED (exit {result.exit_code}){again}: {result.error}"
    s = result.summary
    if isinstance(s, dict):
        merged, shards, seconds, node = s.get("tensors_merged"), s.get("shards") or [], s.get("seconds"), s.get("node")
    else:
        merged, shards, seconds, node = s.tensors_merged, s.shards, s.seconds, None
    where = f" on {node}" if node else ""
    return (f"{head} OK{again}{where}: {merged} tensors merged, {len(shards)} shard(s), {seconds:.1f} s -> "
            f"{job.output}")


def _batch_error(args: argparse.Namespace, token: str | None) -> Any:
    """With --json, a failure of the batch itself (job file, cluster) is one record with `job` null."""
    if not args.json:
        return None

    def report(code: int, message: str, kind: str) -> None:
        from .results import new_record, set_error

        record = new_record("batch", (), job=None, jobs_file=args.jobs)
        emit(set_error(record, code, message, kind), token)

    return report
