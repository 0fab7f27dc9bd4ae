"""`--json` for the command line: the command's record, filled as the work goes on and printed as one line of
JSON on stdout when it ends, successfully or not (the keys are results.py's)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

from .cli import _write_line
from .errors import one_line


def record_for(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """The record of a merge or verify with what the command line already says."""
    from .results import MERGE_KEYS, VERIFY_KEYS, new_record

    known: dict[str, Any] = dict(base=args.base, adapters=list(args.adapter), weights=args.weights, warnings=[])
    if command == "merge":
        known.update(output=args.output, dtype=args.dtype, dry_run=args.dry_run)
        return new_record(command, MERGE_KEYS, **known)
    known.update(merged=args.merged)
    return new_record(command, VERIFY_KEYS, **known)


def collect_warnings(record: dict[str, Any]) -> None:
    """Warnings still go to stderr (as `warning: ...`) and are listed in the record too."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        record.setdefault("warnings", []).append(one_line(str(message)))
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show  # the command line puts its own back when the command ends


def emit(record: dict[str, Any], token: str | None) -> None:
    """One line of JSON on stdout (the token, should it hide in a path or a message, masked)."""
    from .results import dumps

    text = dumps(record)
    _write_line(sys.stdout, text.replace(token, "***") if token else text)


def succeed(record: dict[str, Any], token: str | None) -> None:
    record.update(ok=True, exit_code=0)
    emit(record, token)


def reporter(record: dict[str, Any] | None, token: str | None) -> Callable[[int, str, str], None] | None:
    """What the command line calls with (exit code, message, error type) when the command fails."""
    if record is None:
        return None

    def report(code: int, message: str, kind: str) -> None:
        from .results import set_error

        emit(set_error(record, code, message, kind), token)

    return report
