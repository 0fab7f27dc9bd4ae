"""`streammerge`: a thin command line over `streammerge.merge` (flag-compatible with qlora-merge's CPU merge)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .cli_args import build_parser, build_verify_parser, check_sizes, check_weight_count
from .errors import Interrupted, StreamMergeError, one_line


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code. Called without `argv` it is the process itself: an interrupt
    after the work is done then no longer changes the outcome."""
    from . import cli_json

    process = argv is None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["batch"]:
            from .cli_batch import main_batch

            return main_batch(argv[1:], process)
        if argv[:1] == ["verify"]:
            vparser = build_verify_parser()
            vargs = vparser.parse_args(argv[1:])
            check_sizes(vparser, {"--max-memory": vargs.max_memory})
            check_weight_count(vparser, vargs)
            vtoken = vargs.hf_token or os.environ.get("HF_TOKEN") or None
            vrecord = cli_json.record_for("verify", vargs) if vargs.json else None
            return _run(lambda: _verify(vargs, vtoken, vrecord), vtoken, process, "interrupted; nothing was verified",
                        on_error=cli_json.reporter(vrecord, vtoken))
        parser = build_parser()
        args = parser.parse_args(argv)
        token = args.hf_token or os.environ.get("HF_TOKEN") or None
        check_sizes(parser, {"--max-shard-size": args.max_shard_size, "--max-memory": args.max_memory})
        check_weight_count(parser, args)
        record = cli_json.record_for("merge", args) if args.json else None
        return _run(lambda: _merge(args, token, record), token, process, on_error=cli_json.reporter(record, token))
    except KeyboardInterrupt:  # before the handlers of _run were in place (start-up)
        _say_error("error: interrupted; nothing was written to --output")
        return 130


def _write_line(stream, text: str) -> None:
    """One line on `stream`; characters its encoding cannot show (PYTHONIOENCODING=ascii, a C locale) are
    escaped instead of failing the whole command."""
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding) + "\n")
    stream.flush()


def _can_show(stream, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _say_error(text: str) -> None:
    _write_line(sys.stderr, text)


def _printer(token: str | None, stream: Any = None) -> Callable[[str], None]:
    """print() for stdout (or `stream`) that never shows the token (it could hide in a repo id or a path)."""

    def say(text: str = "") -> None:
        _write_line(stream or sys.stdout, text.replace(token, "***") if token else text)

    return say


DONE_MARK = "\u2705 "  # the check mark scripts look for in front of "Done. Merged model: <dir>"


def _merge(args: argparse.Namespace, token: str | None, record: dict[str, Any] | None = None) -> int:
    import psutil

    from .api import merge
    from .memory import fmt_bytes

    out = sys.stderr if record is not None else sys.stdout  # with --json, stdout holds only the JSON object
    print = _printer(token, out)
    if record is not None:
        from .cli_json import collect_warnings

        collect_warnings(record)
    if args.clamp_f16 and args.dtype in ("bf16", "f32"):
        warnings.warn(f"--clamp-f16 has no effect with --dtype {args.dtype} (only float16 output can overflow)",
                      stacklevel=1)
    vm = psutil.virtual_memory()
    print(f"Base    : {args.base}")
    print(f"Adapter : {_adapters_text(args)}")
    print(f"Output  : {args.output}")
    print(f"Dtype   : {args.dtype}")
    print(f"RAM     : {vm.available / 1e9:.1f} GB free / {vm.total / 1e9:.1f} GB total")
    summary = merge(
        args.base, args.adapter, args.output, weights=args.weights, dtype=args.dtype, loader=args.loader,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, dry_run=args.dry_run, hf_token=token,
        progress=not args.no_progress and sys.stderr.isatty(), max_memory=args.max_memory,
        clamp_f16=args.clamp_f16, log=print, threads=args.threads, resume=args.resume,
    )
    try:
        from .results import requant_lines, summary_fields

        if record is not None:
            record.update(summary_fields(summary))
        print(f"Loader  : {args.loader} -> {summary.layout}" if args.loader == "auto" else f"Loader  : {args.loader}")
        print(f"Elapsed: {summary.seconds:.1f} s | Peak memory: {fmt_bytes(summary.peak_memory)} (anonymous)")
        for line in requant_lines(summary.requantized):
            print(line)
        if args.dry_run:
            print(f"Dry run: {summary.tensors_merged} tensors would be merged, {summary.tensors_copied} copied, "
                  f"into {len(summary.shards)} shard(s); nothing written.")
            return _json_done(record, token, finish=False)
        if args.verify:
            from .verify import verify

            print("Verify: checking sampled rows of every tensor against the float64 reference")
            report = verify(args.base, args.adapter, summary.output, weights=args.weights, loader=args.loader,
                            dtype=args.dtype, hf_token=token, log=print, max_memory=args.max_memory)
            if record is not None:
                from .results import verify_fields

                record["verify"] = verify_fields(report)
            _report(report, print)
        # the last line, exactly as scripts that drive qlora-merge-style CLIs expect it
        mark = DONE_MARK if _can_show(out, DONE_MARK) else ""
        print(f"{mark}Done. Merged model: {summary.output}")
        return _json_done(record, token)
    except KeyboardInterrupt:
        if args.dry_run:
            raise Interrupted("interrupted; nothing was written to --output (dry run)") from None
        unverified = "; it was not verified" if args.verify else ""
        raise Interrupted(f"interrupted after the merge was complete: {summary.output} holds the new merged "
                          f"model{unverified}") from None


def _adapters_text(args: argparse.Namespace) -> str:
    if len(args.adapter) == 1 and args.weights is None:
        return args.adapter[0]
    weights = args.weights or [1.0] * len(args.adapter)
    return " + ".join(f"{w:g} x {a}" for w, a in zip(weights, args.adapter))


def _verify(args: argparse.Namespace, token: str | None, record: dict[str, Any] | None = None) -> int:
    from .verify import verify

    print = _printer(token, sys.stderr if record is not None else sys.stdout)
    if record is not None:
        from .cli_json import collect_warnings

        collect_warnings(record)
    started = time.perf_counter()
    sample = None if args.all_rows else args.sample
    what = "every row" if sample is None else f"the first, the last and ~{sample} random row blocks"
    print(f"Verify: checking {what} of every tensor of {args.merged} against the float64 reference")
    report = verify(args.base, args.adapter, args.merged, weights=args.weights, loader=args.loader,
                    sample_blocks=sample, dtype=args.dtype, hf_token=token, log=print, max_memory=args.max_memory)
    if record is not None:
        from .results import verify_fields

        record.update(verify_fields(report))
    try:
        _report(report, print)
    finally:
        if record is not None:
            record["seconds"] = round(time.perf_counter() - started, 3)
        print(f"Elapsed: {time.perf_counter() - started:.1f} s")
    return _json_done(record, token, finish=False)


def _json_done(record: dict[str, Any] | None, token: str | None, finish: bool = True) -> int:
    if record is not None:
        from .cli_json import succeed

        succeed(record, token)
    if finish:
        _finished.set()  # from here on a signal changes nothing: the command succeeded
    return 0


def _report(report, print: Callable[[str], None] = print) -> int:
    from .errors import VerifyError

    rows = sum(c.rows_checked for c in report.checks)
    total = sum(c.rows for c in report.checks)
    worst = report.worst
    off = sum(c.off_rounded for c in report.checks)
    print(f"Checked {len(report.checks)} tensors ({rows} of {total} rows): largest difference "
          f"{worst.max_ulps if worst else 0} ulp{f' in {worst.name}' if worst and worst.max_ulps else ''} beyond "
          f"float32 rounding ({off} merged value(s) within it but not the float64 value rounded once)")
    if report.ok:
        print("Verify: OK, every checked value matches the float64 reference of base + adapter (copied and "
              "replaced values bit for bit)")
        return 0
    problems = report.problems()
    raise VerifyError(f"merged model differs from base + adapter ({len(problems)} problem(s)): "
                      + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


class _RedactToken(logging.Filter):
    """Keeps the token out of library log records (huggingface_hub logs URLs and errors)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.token in text:
            record.msg, record.args = text.replace(self.token, "***"), None
        return True


_finished = threading.Event()  # the command's work is complete (set by the action, cleared by _run)


def _interrupt(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so the staging directory and the lock are cleaned up on the way out. Only
    # the first signal interrupts: more Ctrl-Cs while cleaning up must not cut the cleanup short.
    if _finished.is_set():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def _run(action, token: str | None, process: bool = False,
         interrupted: str = "interrupted; nothing was written to --output",
         on_error: Callable[[int, str, str], None] | None = None) -> int:
    """Run `action` with the token kept out of every line, warnings as `warning: ...` lines, and every failure
    turned into one `error: ...` line and its exit code (`on_error(code, message, kind)` is told too)."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        _say_error(f"warning: {_clean(str(message), token)}")

    saved_warning = warnings.showwarning
    warnings.showwarning = show_warning
    log_filter = _RedactToken(token) if token else None
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "httpx", "urllib3", "filelock")]
    if log_filter is not None:
        for lg in loggers:
            lg.addFilter(log_filter)
    saved: dict[int, Any] = {}
    _finished.clear()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    code = 1

    def fail(code: int, message: str, kind: str) -> int:
        _say_error(f"error: {message}")
        if on_error is not None:
            on_error(code, message, kind)
        return code

    try:
        code = action()
    except StreamMergeError as e:
        code = fail(e.exit_code, _clean(str(e), token), type(e).__name__)
    except KeyboardInterrupt as e:
        code = fail(130, _clean(str(e), token) if isinstance(e, Interrupted) else interrupted, "Interrupted")
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        code = fail(6, f"{_clean(where + (e.strerror or str(e)), token)}; check the disk and the paths given",
                    "OSError")
    except Exception as e:
        if os.environ.get("STREAMMERGE_DEBUG"):
            raise
        code = fail(1, f"internal error {type(e).__name__}: {_clean(str(e), token)} (a streammerge bug: please "
                       "report it; set STREAMMERGE_DEBUG=1 for the traceback)", "InternalError")
    finally:
        warnings.showwarning = saved_warning
        for sig_num, handler in saved.items():
            # a process whose work is done ignores late signals: its exit code already tells the truth
            signal.signal(sig_num, signal.SIG_IGN if process else handler)
        if log_filter is not None:
            for lg in loggers:
                lg.removeFilter(log_filter)
    return code


def _clean(text: str, token: str | None) -> str:
    text = one_line(text)
    return text.replace(token, "***") if token else text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
