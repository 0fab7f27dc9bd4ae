"""One safetensors file: its header parsed and validated strictly before any weight is touched.

A truncated or corrupt download fails up front with one line that names the file and the fix: every offset,
size, dtype and shape is checked against the file size, and the tensors must tile the data exactly.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingFileError
from .formats import DTYPES, ITEMSIZE, SUBBYTE

# The safetensors reader refuses headers above 100 MB; so do we, before allocating anything for one.
MAX_HEADER_SIZE = 100_000_000

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and size, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int
    # (inode, size, mtime_ns) of the file when its header was read: a later read that sees another file fails
    stamp: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def rows(self) -> int:
        """Size of dim 0 (1 for a 0-d tensor)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        """Bytes in one row of dim 0 (the whole tensor for a 0-d tensor)."""
        return math.prod(self.shape[1:]) * self.itemsize




def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass: never a valid size or offset.
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _DuplicateKey(dup)
    return dict(pairs)


class _DuplicateKey(Exception):
    pass


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_error(path: Path, exc: OSError, verb: str = "open") -> CheckpointError:
    """One line for a file that cannot be opened or read; running out of file descriptors is not a permission
    problem and says so."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return CheckpointError(f"{path}: cannot {verb}: too many open files (limit {nofile_limit()} for this "
                               "process); raise it with `ulimit -n` or close other programs")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{path}: cannot {verb}: permission denied; check the file's permissions")
    return CheckpointError(f"{path}: cannot {verb}: {exc.strerror or exc}; check the disk and the file")


def nofile_limit() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1024
    return soft if soft != getattr(resource, "RLIM_INFINITY", -1) else 1 << 20


_REDOWNLOAD = "re-download the file"


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and strictly validate one safetensors header; returns (tensors in data-offset order, __metadata__)."""
    path = Path(path)
    raw, size, stamp = _raw_header(path)
    header, metadata = _parse_header(path, raw)
    data_start = 8 + len(raw)
    entries: list[tuple[int, int, TensorInfo]] = []
    for name, entry in header.items():
        begin, end, dtype, shape = _check_entry(f"{path}: tensor {name!r}", entry)
        entries.append((begin, end, TensorInfo(name, dtype, shape, path, data_start + begin, end - begin, stamp)))
    _check_tiling(path, entries, data_start, size)
    return {info.name: info for _, _, info in entries}, dict(metadata)


def _raw_header(path: Path) -> tuple[bytes, int, tuple[int, int, int]]:
    """(header bytes, file size, stamp) with the length prefix checked against the file before any allocation."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if size < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header: "
                                      f"{_REDOWNLOAD}")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_SIZE:
                raise CheckpointError(
                    f"{path}: header length {header_len} is over the 100 MB limit: not a safetensors file or corrupt; "
                    f"{_REDOWNLOAD}"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds the file size ({size} bytes): the file is truncated "
                    f"or not a safetensors file; {_REDOWNLOAD}"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found: check the path or re-download the model") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as exc:
        raise open_error(path, exc, "read") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: file shrank while reading its header: {_REDOWNLOAD}")
    return raw, size, stamp


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, object], dict[str, str]]:
    """(tensor entries, __metadata__) of the header's JSON, which must be one object of valid Unicode."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: header is not UTF-8: corrupt file; {_REDOWNLOAD}") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: header lists key {exc.args[0]!r} twice: corrupt file; {_REDOWNLOAD}") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: header is not valid JSON: corrupt file; {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object: corrupt file; {_REDOWNLOAD}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings: corrupt file; {_REDOWNLOAD}")
    # JSON escapes can spell unpaired surrogates, which no UTF-8 file can hold (safetensors refuses them too)
    for text in (*header, *metadata, *metadata.values()):
        if not _is_unicode(text):
            raise CheckpointError(f"{path}: the header names {text!r}, which is not valid Unicode (an unpaired "
                                  f"surrogate escape): corrupt file; {_REDOWNLOAD}")
    return header, metadata


def _check_entry(where: str, entry: object) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one tensor's header entry, every field checked."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object: corrupt file; {_REDOWNLOAD}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype is None or shape is None or offsets is None:
        missing = [k for k in ("dtype", "shape", "data_offsets") if entry.get(k) is None]
        raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}: corrupt file; {_REDOWNLOAD}")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a string: corrupt file; {_REDOWNLOAD}")
    if dtype not in DTYPES:
        if dtype in SUBBYTE:
            raise CheckpointError(
                f"{where}: sub-byte dtype {dtype} is not supported by streammerge: dequantize the checkpoint first"
            )
        raise CheckpointError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)}): corrupt file or a newer format; "
            f"{_REDOWNLOAD} or upgrade torch/streammerge"
        )
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of integers: corrupt file; {_REDOWNLOAD}")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape} has a negative dimension: corrupt file; {_REDOWNLOAD}")
    if any(d > _INT64_MAX for d in shape) or math.prod(d for d in shape if d) * ITEMSIZE[dtype] > _INT64_MAX:
        raise CheckpointError(f"{where}: shape {shape} is too large to exist: corrupt file; {_REDOWNLOAD}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]: corrupt file; {_REDOWNLOAD}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] do not satisfy 0 <= begin <= end: corrupt file; {_REDOWNLOAD}"
        )
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}: corrupt file; "
            f"{_REDOWNLOAD}"
        )
    return begin, end, dtype, tuple(shape)


def _check_tiling(path: Path, entries: list[tuple[int, int, TensorInfo]], data_start: int, size: int) -> None:
    """safetensors requires the tensors to tile the data buffer exactly: no gaps, no overlaps, nothing after
    (sorts `entries` by data offset)."""
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, info in entries:
        if begin != cursor:
            problem = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise CheckpointError(
                f"{path}: tensor {info.name!r} at data offset {begin} {problem}: corrupt file; {_REDOWNLOAD}"
            )
        cursor = end
    if data_start + cursor != size:
        if data_start + cursor > size:
            problem = f"is truncated: {size} bytes on disk, the header needs {data_start + cursor}"
        else:
            problem = f"has {size - data_start - cursor} bytes after the last tensor"
        raise CheckpointError(f"{path}: file {problem}: {_REDOWNLOAD}")
