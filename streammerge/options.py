"""User-facing choices of a merge, checked and turned into numbers: the output dtype, sizes, the block size."""

from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation

from .io.formats import FLOAT_DTYPES

# --dtype -> the safetensors dtype float tensors are written in (None: keep each tensor's own). "keep" is "auto"
# that also keeps a quantized base quantized (plan/quantized.py); on a full-precision base the two are the same.
OUT_DTYPES: dict[str, str | None] = {"bf16": "BF16", "f16": "F16", "f32": "F32", "auto": None, "keep": None}

DEFAULT_BLOCK_BYTES = 4 * 2**20  # float32 row blocks of ~4 MiB stay in L2/L3; whole-tensor math is ~6x slower


def output_dtype(choice: str, base_dtype: str) -> str:
    """The safetensors dtype a tensor is written in for --dtype `choice` (non-float tensors keep theirs)."""
    if choice not in OUT_DTYPES:
        raise ValueError(f"unknown dtype {choice!r}; choose one of {', '.join(OUT_DTYPES)}")
    target = OUT_DTYPES[choice]
    if target is None or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return target


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from "5GB" (10^9), "2GiB" (2^30), "500MB", "1000" or an int; ValueError for anything else."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a number with a unit, e.g. 5GB, 2GiB")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"invalid size {text}: must be a positive number of bytes")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(
            f"invalid size {text!r}: use a number of bytes or a number with a unit, e.g. 5GB, 500MB, 2GiB"
        )
    number, unit = match.groups()
    try:
        value = int(Decimal(number) * _UNITS[(unit or "b").lower()])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid size {text!r}: not a number") from None
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def block_bytes(max_memory: str | int | None) -> int:
    """Bytes of one float32 row block for a `--max-memory` budget (the default when there is none)."""
    if max_memory is None:
        return DEFAULT_BLOCK_BYTES
    budget = parse_size(max_memory)
    # a float32 block lives ~3 times at once (source upcast, delta, output cast): keep that well inside the budget
    return max(64 * 1024, min(DEFAULT_BLOCK_BYTES, budget // 16))


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int:
    """The compute threads for `threads` (None: `default_threads()`); ValueError for anything but a positive int."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, not {threads!r}")
    return threads
