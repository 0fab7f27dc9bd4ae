"""One job of a batch file run as a normal streaming merge (`streammerge.merge`), its outcome as a JobResult.

Used by each task of the distributed engine (distributed.py) on whichever machine runs it; a local batch goes
through the one-pass engine (batch.py) instead.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .errors import StreamMergeError
from .jobs import Job, JobResult

Log = Callable[[str], None]


def merge_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The job file's options `streammerge.merge` takes; an option this version has no use for is named in a
    warning instead of failing every job."""
    from .api import merge

    accepted = inspect.signature(merge).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(options)  # a wrapper around merge: it takes whatever merge takes
    unused = sorted(k for k in options if k not in accepted)
    if unused:
        warnings.warn(f"job file option(s) {unused} are not used by this version of streammerge; the jobs run "
                      "without them", stacklevel=2)
    return {k: v for k, v in options.items() if k in accepted}


def run_job(base: str, job: Job, options: Mapping[str, Any], *, hf_token: str | None = None, log: Log | None = None,
            progress: bool = False) -> JobResult:
    """Merge one job; an expected failure (any StreamMergeError) is its result, not an exception. A plain OSError
    (an I/O error on the way) and an interrupt propagate: the caller decides (the distributed engine retries the
    former once); any other exception is reported as an internal error (exit 1)."""
    from .api import merge

    try:
        summary = merge(base, list(job.adapters), job.output, weights=job.weights, hf_token=hf_token, log=log,
                        progress=progress, **options)
    except StreamMergeError as e:
        return JobResult(job, ok=False, exit_code=e.exit_code, error=_one_line(str(e), hf_token))
    except OSError:
        raise
    except Exception as e:
        return JobResult(job, ok=False, exit_code=1, error=_one_line(
            f"internal error {type(e).__name__}: {e} (a streammerge bug: please report it)", hf_token))
    return JobResult(job, ok=True, summary=summary)


def os_error_result(job: Job, e: OSError, hf_token: str | None = None, attempts: int = 1) -> JobResult:
    """A job stopped by a plain OSError, reported as the command line reports one (exit 6)."""
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return JobResult(job, ok=False, exit_code=6, attempts=attempts,
                     error=_one_line(f"{where}{e.strerror or e}; check the disk and the paths given", hf_token))


def _one_line(text: str, token: str | None) -> str:
    from .errors import one_line

    text = one_line(text)
    return text.replace(token, "***") if token else text
