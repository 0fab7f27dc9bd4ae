"""The distributed engine: a batch's jobs as Ray tasks, each a normal streaming merge (`streammerge.merge`) on a
node that sees the same files (a shared filesystem, or the same Hugging Face cache).

Ray schedules; this module only asks. Each job is one task with its own resource request (CPUs and memory,
derived from the job unless the job file or the command line says otherwise); its progress lines come back
through a Ray queue (Ray's streaming of worker output is best effort and may drop the last lines when the driver
disconnects), and its result as soon as it ends, after its progress. A task lost to
the infrastructure (its worker or node died, the memory monitor killed it, its result was lost) or stopped by a
plain I/O error is submitted once more; a StreamMergeError is the job's answer and is never retried (the same
inputs fail the same way). Ray is an optional extra and is imported here only, when a batch runs with --ray.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ClusterError, one_line
from .jobs import BatchSpec, Job, JobResult, Resources
from .memory import fmt_bytes

# what a merge needs besides its adapter factors: Python, torch and the row-block buffers (~300 MB peak RSS
# measured), with headroom
RUNTIME_MEMORY = 1 << 30
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Request:
    """The resources one job's task asks for."""

    num_cpus: float
    memory: int

    def describe(self) -> str:
        return f"{self.num_cpus:g} CPU, {fmt_bytes(self.memory)}"


def job_request(spec: BatchSpec, job: Job, flags: Resources | None = None) -> Request:
    """A job's request: its own `resources` in the job file, else the command line's, else the file's top-level
    `resources`, else derived (one CPU, or `threads`; the runtime plus twice the adapters' size plus
    `max_memory`)."""
    layers = [r for r in (job.resources, flags, spec.resources) if r is not None]
    cpus = next((r.num_cpus for r in layers if r.num_cpus is not None), None)
    memory = next((r.memory for r in layers if r.memory is not None), None)
    if cpus is None:
        threads = spec.options.get("threads")
        cpus = float(threads) if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else 1.0
    if memory is None:
        memory = _derived_memory(job, spec.options)
    return Request(cpus, memory)


def _derived_memory(job: Job, options: Mapping[str, Any]) -> int:
    from .options import parse_size

    # float32 factors of a bf16 adapter take twice its size; files the driver cannot see (repo ids, paths on
    # the cluster only) count as small
    adapters = sum(_size(Path(a) / name) for a in job.adapters for name in ADAPTER_WEIGHTS)
    budget = options.get("max_memory")
    return RUNTIME_MEMORY + 2 * adapters + (parse_size(budget) if budget else 0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def import_ray() -> Any:
    """Ray, or one ClusterError line saying how to install it."""
    # Ray folds log lines that differ only in numbers into one ("[job-1] ..." and "[job-2] ..."): the progress of
    # every job must reach the driver. (Read when ray is imported; a choice already made in the environment wins.)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray, which is not installed: pip install 'streammerge[ray]' (on this machine "
                           "and on every node of the cluster)") from None
    return ray


def run_on_ray(spec: BatchSpec, *, address: str | None, hf_token: str | None = None,
               flags: Resources | None = None, on_result: Callable[[int, JobResult], None],
               say: Callable[[str], None] = lambda _m: None) -> list[JobResult]:
    """Run every job of `spec` as a Ray task on the cluster at `address` (None: RAY_ADDRESS, or a new local
    cluster); `on_result(index, result)` as each job ends, in the order they end."""
    from .jobrun import merge_options

    ray = import_ray()
    spec = _absolute(spec)
    options = merge_options(spec.options)
    connected = _connect(ray, address)
    try:
        return _Driver(ray, spec, options, hf_token, flags, on_result, say).run()
    finally:
        if connected:
            ray.shutdown()


def _connect(ray: Any, address: str | None) -> bool:
    """Connect (True) unless this process is connected already (a program that called ray.init itself)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, namespace="streammerge")
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError... for the same few causes
        where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise ClusterError(f"cannot connect to the Ray cluster ({where}): {one_line(str(e))[:300]}; check the "
                           "address ('ray status' on the head node), the network, and RAY_AUTH_TOKEN when the "
                           "cluster uses token authentication") from None
    return True


class _Driver:
    """Submits the tasks, gathers results as they end, retries lost tasks once."""

    def __init__(self, ray: Any, spec: BatchSpec, options: dict[str, Any], hf_token: str | None,
                 flags: Resources | None, on_result: Callable[[int, JobResult], None],
                 say: Callable[[str], None]) -> None:
        self.ray, self.spec, self.options, self.hf_token = ray, spec, options, hf_token
        self.flags, self.on_result, self.say = flags, on_result, say
        self.remote = ray.remote(merge_task)
        self.pending: dict[Any, tuple[int, int]] = {}   # task ref -> (job index, attempt)
        self.results: list[JobResult | None] = [None] * len(spec.jobs)
        self.progress: Any = None

    def run(self) -> list[JobResult]:
        largest = _largest_node(self.ray)
        for i, job in enumerate(self.spec.jobs):
            request = job_request(self.spec, job, self.flags)
            misfit = _misfit(request, largest)
            if misfit:
                self._done(i, JobResult(job, ok=False, exit_code=ClusterError.exit_code, attempts=0,
                                        error=f"the job asks for {request.describe()}, {misfit}: lower it with "
                                              "'resources' in the job file or --cpus-per-job / --memory-per-job"))
                continue
            if self.progress is None:
                from ray.util.queue import Queue

                self.progress = Queue(actor_options={"num_cpus": 0})
            self._submit(i, 1)
        self.say(f"Ray: {len(self.pending)} job(s) submitted to a cluster of {_describe_nodes(self.ray)}")
        try:
            while self.pending:
                ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=0.5)
                self._show_progress()
                for ref in ready:
                    self._collect(ref)
        except KeyboardInterrupt:
            for ref in self.pending:
                self.ray.cancel(ref)  # the tasks unwind as an interrupted merge does: staging removed
            raise
        finally:
            if self.progress is not None:
                self.progress.shutdown(force=True)
        return [r for r in self.results if r is not None]

    def _submit(self, i: int, attempt: int) -> None:
        job = self.spec.jobs[i]
        request = job_request(self.spec, job, self.flags)
        options = dict(self.options)
        if "threads" in _merge_parameters() and "threads" not in options:
            options["threads"] = max(1, int(request.num_cpus))  # compute on the CPUs the task was given
        ref = self.remote.options(
            num_cpus=request.num_cpus, memory=request.memory, max_retries=0, retry_exceptions=False,
            name=f"streammerge:{job.label}",
        ).remote(self.spec.base, job, options, self.hf_token, self.progress)
        self.pending[ref] = (i, attempt)
        self.say(f"[{job.label}] submitted ({request.describe()}){' again' if attempt > 1 else ''}")

    def _collect(self, ref: Any) -> None:
        i, attempt = self.pending.pop(ref)
        job = self.spec.jobs[i]
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            if attempt == 1 and _retryable(self.ray, e):
                self.say(f"[{job.label}] attempt 1 failed ({_reason(e)}); retrying once")
                self._submit(i, attempt + 1)
                return
            self._done(i, _lost(self.ray, job, e, attempt, self.hf_token))
            return
        self._done(i, JobResult(job, ok=outcome["ok"], exit_code=outcome["exit_code"], error=outcome["error"],
                                summary=outcome["summary"], attempts=attempt))

    def _show_progress(self) -> None:
        """The progress lines the tasks have sent so far (a task sends its last before it returns)."""
        waiting = self.progress.qsize() if self.progress is not None else 0
        for label, text in self.progress.get_nowait_batch(waiting) if waiting else ():
            self.say(f"[{label}] {text}")

    def _done(self, i: int, result: JobResult) -> None:
        self.results[i] = result
        self.on_result(i, result)


def merge_task(base: str, job: Job, options: dict[str, Any], hf_token: str | None, progress: Any = None
               ) -> dict[str, Any]:
    """The body of one task, on a worker: the job as a normal merge, its outcome as plain data. Progress lines go
    to the driver's queue (to stderr without one)."""
    from .jobrun import run_job
    from .results import summary_fields

    node = socket.gethostname()

    def log(text: str) -> None:
        if progress is not None:
            progress.put((job.label, text))
        else:
            print(f"[{job.label}] {text}", file=sys.stderr, flush=True)

    log(f"started on {node} (pid {os.getpid()})")
    result = run_job(base, job, options, hf_token=hf_token, log=log)  # an OSError propagates: retried
    summary = summary_fields(result.summary) if result.ok else {}
    summary["node"] = node
    return {"ok": result.ok, "exit_code": result.exit_code, "error": result.error, "summary": summary}


def _merge_parameters() -> Any:
    import inspect

    from .api import merge

    return inspect.signature(merge).parameters


def _retryable(ray: Any, e: Exception) -> bool:
    """Infrastructure failures and plain I/O errors; never a job's own (deterministic) answer."""
    ex = ray.exceptions
    lost = (ex.WorkerCrashedError, ex.NodeDiedError, ex.LocalRayletDiedError, ex.OutOfMemoryError,
            ex.ObjectLostError)
    if isinstance(e, lost):
        return True
    return isinstance(e, ex.RayTaskError) and isinstance(e.cause, OSError)


def _lost(ray: Any, job: Job, e: Exception, attempts: int, hf_token: str | None) -> JobResult:
    from .jobrun import os_error_result

    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, OSError):
        return os_error_result(job, e.cause, hf_token, attempts)
    if isinstance(e, ray.exceptions.RayTaskError):
        return JobResult(job, ok=False, exit_code=1, attempts=attempts,
                         error=f"internal error {_reason(e)} (a streammerge bug: please report it)")
    again = " on both attempts" if attempts > 1 else ""
    return JobResult(job, ok=False, exit_code=ClusterError.exit_code, attempts=attempts,
                     error=f"the Ray task running this job was lost{again} ({_reason(e)}); check the cluster's "
                           "nodes and their memory, then run the job again")


def _reason(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    shown = cause if isinstance(cause, BaseException) else e
    text = one_line(str(shown)).split("; ")[0]
    return f"{type(shown).__name__}: {text[:200]}"


def _largest_node(ray: Any) -> tuple[float, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    memory = max((n["Resources"].get("memory", 0.0) for n in nodes), default=0.0)
    return cpus, memory


def _misfit(request: Request, largest: tuple[float, float]) -> str:
    """Why no node can ever run the task ('' when one can): Ray would keep such a task waiting for ever."""
    cpus, memory = largest
    if request.num_cpus > cpus or request.memory > memory:
        return f"more than the largest node of the cluster has ({cpus:g} CPU, {fmt_bytes(int(memory))})"
    return ""


def _describe_nodes(ray: Any) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU"


def _absolute(spec: BatchSpec) -> BatchSpec:
    """Relative paths made absolute here: a task's working directory on a worker is not this one's. (A path
    that does not exist here stays as it is: a repo id, or a path only the cluster sees.)"""
    def local(p: str) -> str:
        return os.path.abspath(p) if os.path.exists(p) else p

    jobs = tuple(replace(j, adapters=tuple(local(a) for a in j.adapters), output=os.path.abspath(j.output))
                 for j in spec.jobs)
    return replace(spec, base=local(spec.base), jobs=jobs)
