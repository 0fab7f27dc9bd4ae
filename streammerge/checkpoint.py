"""Read base checkpoints strictly: safetensors headers, the shard index, and zero-copy tensor views.

Nothing here loads a model. Headers are parsed and checked against the file size before any weight is touched,
so a truncated or corrupt download fails up front with one line that names the file and the fix. The merge reads
tensor data with pread into buffers it reuses (a memory map would kill the process with SIGBUS if the file were
truncated during the merge), re-checking each file's size and mtime against those its header was read with.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import json
import math
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, MissingFileError
from .io.formats import DTYPES, ITEMSIZE, SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE, SUBBYTE, TORCH_TO_ST  # noqa: F401

SAFE_WEIGHTS_NAME = SAFETENSORS_SINGLE_FILE
SAFE_WEIGHTS_INDEX_NAME = SAFETENSORS_INDEX_FILE

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


# ----------------------------------------------------------------------------------------------------------------
# one safetensors file


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
        return CheckpointError(f"{path}: cannot {verb}: too many open files (limit {_nofile_limit()} for this "
                               "process); raise it with `ulimit -n` or close other programs")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{path}: cannot {verb}: permission denied; check the file's permissions")
    return CheckpointError(f"{path}: cannot {verb}: {exc.strerror or exc}; check the disk and the file")


def _nofile_limit() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1024
    return soft if soft != getattr(resource, "RLIM_INFINITY", -1) else 1 << 20


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and strictly validate one safetensors header; returns (tensors in data-offset order, __metadata__)."""
    path = Path(path)
    redownload = "re-download the file"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if size < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header: {redownload}")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_SIZE:
                raise CheckpointError(
                    f"{path}: header length {header_len} is over the 100 MB limit: not a safetensors file or corrupt; "
                    f"{redownload}"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds the file size ({size} bytes): the file is truncated "
                    f"or not a safetensors file; {redownload}"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found: check the path or re-download the model") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as exc:
        raise open_error(path, exc, "read") from None
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: file shrank while reading its header: {redownload}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: header is not UTF-8: corrupt file; {redownload}") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: header lists key {exc.args[0]!r} twice: corrupt file; {redownload}") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: header is not valid JSON: corrupt file; {redownload}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object: corrupt file; {redownload}")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings: corrupt file; {redownload}")
    # JSON escapes can spell unpaired surrogates, which no UTF-8 file can hold (safetensors refuses them too)
    for text in (*header, *metadata, *metadata.values()):
        if not _is_unicode(text):
            raise CheckpointError(f"{path}: the header names {text!r}, which is not valid Unicode (an unpaired "
                                  f"surrogate escape): corrupt file; {redownload}")

    data_start = 8 + header_len
    entries: list[tuple[int, int, TensorInfo]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object: corrupt file; {redownload}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype is None or shape is None or offsets is None:
            missing = [k for k in ("dtype", "shape", "data_offsets") if entry.get(k) is None]
            raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}: corrupt file; {redownload}")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: dtype {dtype!r} is not a string: corrupt file; {redownload}")
        if dtype not in DTYPES:
            if dtype in SUBBYTE:
                raise CheckpointError(
                    f"{where}: sub-byte dtype {dtype} is not supported by streammerge: dequantize the checkpoint first"
                )
            raise CheckpointError(
                f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)}): corrupt file or a newer format; "
                f"{redownload} or upgrade torch/streammerge"
            )
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of integers: corrupt file; {redownload}")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape} has a negative dimension: corrupt file; {redownload}")
        if any(d > _INT64_MAX for d in shape) or math.prod(d for d in shape if d) * ITEMSIZE[dtype] > _INT64_MAX:
            raise CheckpointError(f"{where}: shape {shape} is too large to exist: corrupt file; {redownload}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(
                f"{where}: data_offsets {offsets!r} is not [begin, end]: corrupt file; {redownload}"
            )
        begin, end = offsets
        if begin < 0 or end < begin:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] do not satisfy 0 <= begin <= end: corrupt file; {redownload}"
            )
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}: corrupt file; "
                f"{redownload}"
            )
        info = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin, stamp)
        entries.append((begin, end, info))

    # safetensors requires the tensors to tile the data buffer exactly: no gaps, no overlaps, nothing after.
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, info in entries:
        if begin != cursor:
            problem = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise CheckpointError(
                f"{path}: tensor {info.name!r} at data offset {begin} {problem}: corrupt file; {redownload}"
            )
        cursor = end
    if data_start + cursor != size:
        if data_start + cursor > size:
            problem = f"is truncated: {size} bytes on disk, the header needs {data_start + cursor}"
        else:
            problem = f"has {size - data_start - cursor} bytes after the last tensor"
        raise CheckpointError(f"{path}: file {problem}: {redownload}")
    return {info.name: info for _, _, info in entries}, dict(metadata)


# ----------------------------------------------------------------------------------------------------------------
# a model folder


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a (possibly sharded) safetensors checkpoint, without any data loaded."""

    root: Path
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    index_path: Path | None


def _allowed_dirs(root: Path) -> list[Path]:
    """Directories shard files may resolve into: the model folder, and the blob store of a Hugging Face cache.

    A hub cache snapshot (`.../snapshots/<rev>/`) holds symlinks into `../../blobs/`, written by huggingface_hub
    itself; refusing those would refuse every cached model.
    """
    real = root.resolve()
    dirs = [real]
    if real.parent.name == "snapshots":
        dirs.append(real.parent.parent / "blobs")
    return dirs


def _inside(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in dirs)


def _shard_path(root: Path, index_path: Path, name: object, tensor: str) -> Path:
    fix = "the index is corrupt or malicious; re-download the model"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index_path}: weight_map[{tensor!r}] = {name!r} is not a file name: {fix}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{index_path}: weight_map[{tensor!r}] = {name!r} points outside the model folder: {fix}"
        )
    path = root / rel
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # symlink loops
        raise CheckpointError(f"{index_path}: shard {name!r} cannot be resolved (symlink loop?): {fix}") from None
    if not _inside(real, _allowed_dirs(root)):
        raise CheckpointError(
            f"{index_path}: shard {name!r} resolves to {real}, outside the model folder {root.resolve()}: {fix}"
        )
    return path


def _read_index(root: Path, index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{index_path}: not a readable JSON file: re-download the model") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: has no \"weight_map\" object: re-download the model")
    if not weight_map:
        raise CheckpointError(f"{index_path}: \"weight_map\" lists no tensors: re-download the model")
    return weight_map


def _missing_weights_error(root: Path) -> MissingFileError:
    bins = sorted(p.name for p in root.glob("*.bin"))
    if bins:
        return MissingFileError(
            f"{root}: has {bins[0]}{' and more' if len(bins) > 1 else ''} but no {SAFE_WEIGHTS_NAME}: streammerge reads "
            "safetensors only; convert first, e.g. load the model with transformers and "
            "save_pretrained(dir, safe_serialization=True), or use the Hub's 'Convert to safetensors' Space"
        )
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if others:
        return MissingFileError(
            f"{root}: has {', '.join(others[:3])} but neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: "
            f"rename a single-file checkpoint to {SAFE_WEIGHTS_NAME} or add the index"
        )
    return MissingFileError(
        f"{root}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}: point to the folder that holds the model weights"
    )


def open_checkpoint(root: Path | str) -> Checkpoint:
    """Read and cross-check every header of the checkpoint in `root` (single file or sharded with an index)."""
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"{root}: model folder does not exist: check the path")
    if not root.is_dir():
        raise MissingFileError(f"{root}: is not a folder: pass the folder that holds the model's safetensors files")

    single = root / SAFE_WEIGHTS_NAME
    index_path = root / SAFE_WEIGHTS_INDEX_NAME
    # transformers loads model.safetensors when it exists, even next to an index; follow it.
    if single.is_file():
        tensors, _ = read_header(single)
        return Checkpoint(root, tensors, (single,), None)
    if not index_path.is_file():
        raise _missing_weights_error(root)

    weight_map = _read_index(root, index_path)
    disagree = "the index and shards disagree: re-download the model"
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        _shard_path(root, index_path, shard, tensor)
        by_shard.setdefault(shard, []).append(tensor)

    tensors: dict[str, TensorInfo] = {}
    files: list[Path] = []
    for shard in sorted(by_shard):
        path = root / shard
        if not path.is_file():
            raise MissingFileError(f"{path}: shard listed in {index_path.name} is missing: re-download the model")
        infos, _ = read_header(path)
        listed = set(by_shard[shard])
        for name in by_shard[shard]:
            if name not in infos:
                raise CheckpointError(f"{path}: tensor {name!r} is listed for this shard but not in it: {disagree}")
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is also in {tensors[name].path.name}: {disagree}"
                )
            if name not in listed:
                where = f"listed under {weight_map[name]}" if name in weight_map else f"not in {index_path.name}"
                raise CheckpointError(f"{path}: tensor {name!r} is in this shard but {where}: {disagree}")
            tensors[name] = info
        files.append(path)
    return Checkpoint(root, tensors, tuple(files), index_path)


# ----------------------------------------------------------------------------------------------------------------
# reading tensor data


def _changed(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file changed after its header was read (truncated, rewritten or replaced during the merge); "
        "re-run once the model files are complete and nothing writes to them"
    )


def _max_open() -> int:
    """Shard files a reader keeps open: a small share of the process's descriptor limit."""
    return max(4, min(128, _nofile_limit() // 8))


def _writable_bytes(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no numpy needed); `buf` must outlive it."""
    n = buf.numel() * buf.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(buf.data_ptr())).cast("B")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # platforms without preadv: one extra copy
    view[: len(data)] = data
    return len(data)


class TensorReader:
    """Reads tensor data from shard files, with at most `max_open` of them open at once (the least recently used
    is closed first), so a checkpoint with thousands of shards stays far below the open-files limit.

    `read_rows` copies rows with pread into a caller's reusable buffer and re-checks the file against the stamp
    its header was read with: a file truncated, rewritten or replaced during the merge is a CheckpointError, never
    a SIGBUS. `rows`/`tensor` are zero-copy memory-mapped views, for callers that hold data only briefly.
    Safe to share between the main thread and the writer thread.
    """

    def __init__(self, max_open: int | None = None) -> None:
        self.max_open = max(1, max_open or _max_open())
        self._lock = threading.Lock()
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._pins: dict[Path, int] = {}
        self._maps: OrderedDict[Path, mmap.mmap] = OrderedDict()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        # next_rows: two buffers (the block handed out, the block being read ahead) and the helper thread
        self._pair = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._slot = 0
        self._ahead: tuple[tuple, concurrent.futures.Future, int] | None = None
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A byte buffer of at least `nbytes` for `read_rows`, the same one each call (grown when needed): one
        allocation for a whole merge instead of one per tensor. Its previous contents are not kept."""
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # let the old one go first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]

    # -- file descriptors -----------------------------------------------------------------------------------------

    def _acquire(self, path: Path, stamp: tuple[int, int, int] | None = None) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                self._evict(self.max_open - 1)
                fd = self._open(path)
                self._fds[path] = fd
            else:
                self._fds.move_to_end(path)
            self._pins[path] = self._pins.get(path, 0) + 1
        if stamp is not None:
            try:
                self._check(fd, path, stamp)
            except BaseException:
                self._unpin(path)
                raise
        return fd

    def _unpin(self, path: Path) -> None:
        with self._lock:
            left = self._pins.get(path, 0) - 1
            if left > 0:
                self._pins[path] = left
            else:
                self._pins.pop(path, None)

    def _evict(self, keep: int) -> None:
        for path in list(self._fds):
            if len(self._fds) <= keep:
                break
            if not self._pins.get(path):
                fd = self._fds.pop(path)
                try:
                    os.close(fd)
                except OSError:
                    pass

    @staticmethod
    def _open(path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise MissingFileError(f"{path}: disappeared after its header was read: re-download the model") from None
        except OSError as exc:
            raise open_error(path, exc) from None

    @staticmethod
    def _check(fd: int, path: Path, stamp: tuple[int, int, int] | None) -> None:
        if stamp is None:
            return
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != stamp:
            raise _changed(path)

    @contextlib.contextmanager
    def opened(self, path: Path, stamp: tuple[int, int, int] | None = None) -> Iterator[int]:
        """An O_RDONLY fd for `path`, kept open (never evicted) until the block ends; with `stamp`, the file must
        still be the one the header was read from."""
        path = Path(path)
        fd = self._acquire(path, stamp)
        try:
            yield fd
        finally:
            self._unpin(path)

    def fd(self, path: Path) -> int:
        """An O_RDONLY fd for `path` (cached). It may be closed once more than `max_open` other files are opened:
        hold it with `opened()` while using it."""
        path = Path(path)
        fd = self._acquire(path)
        self._unpin(path)
        return fd

    def check(self, info: TensorInfo) -> None:
        """Fail if the file of `info` is no longer the one its header was read from (size, mtime or inode)."""
        with self.opened(info.path, info.stamp):
            pass

    # -- reading --------------------------------------------------------------------------------------------------

    def _span(self, info: TensorInfo, start: int, stop: int) -> tuple[int, int, tuple[int, ...]]:
        """(byte offset in the tensor, byte count, shape) of rows [start, stop)."""
        if not 0 <= start <= stop <= info.rows:
            raise ValueError(f"rows [{start}, {stop}) out of range for tensor {info.name!r} with {info.rows} rows")
        if not info.shape:
            return 0, info.nbytes if stop > start else 0, () if stop > start else (0,)
        return start * info.row_nbytes, (stop - start) * info.row_nbytes, (stop - start, *info.shape[1:])

    def read_rows(self, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 read with pread into `out` (a contiguous uint8 buffer, reused by the caller
        from block to block) or into a new tensor; a 0-d tensor has one row and comes back 0-d.

        The result is a view of `out`, valid until the caller writes to it. A file that is shorter than its
        header says, or whose size or mtime changed since, raises CheckpointError.
        """
        begin, nbytes, shape = self._span(info, start, stop)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < nbytes:
            raise ValueError(f"read_rows: `out` must be a contiguous uint8 buffer of at least {nbytes} bytes")
        buf = out.reshape(-1)[:nbytes]
        if nbytes:
            view = _writable_bytes(buf)
            with self.opened(info.path, info.stamp) as fd:
                done, offset = 0, info.offset + begin
                while done < nbytes:
                    got = _pread_into(fd, view[done:], offset + done)
                    if got == 0:
                        raise _changed(info.path)
                    done += got
                self._check(fd, info.path, info.stamp)
        return buf.view(info.torch_dtype).view(shape)

    def next_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as `read_rows` gives them, in one of two buffers of the reader's own, while the
        block after them (same tensor, same size) is read on a helper thread: a tensor read block by block waits
        for the copy out of the page cache only for its first block. The result is valid until the next call."""
        ahead, self._ahead = self._ahead, None
        rows = None
        if ahead is not None:
            key, future, slot = ahead
            if key == (info.path, info.offset, start, stop):
                rows, self._slot = future.result(), slot  # raises what the helper met (a changed file)
                self.check(info)  # and the file may have changed since the helper read it
            else:
                concurrent.futures.wait([future])  # its buffer is about to be reused; its outcome does not matter
        if rows is None:
            self._slot = 1 - self._slot
            rows = self.read_rows(info, start, stop, self._pair_buffer(self._slot, info, start, stop))
        after = min(info.rows, 2 * stop - start)
        if start < stop < after:
            slot = 1 - self._slot
            out = self._pair_buffer(slot, info, stop, after)
            if self._helper is None:
                self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streammerge-read")
            future = self._helper.submit(self.read_rows, info, stop, after, out)
            self._ahead = ((info.path, info.offset, stop, after), future, slot)
        return rows

    def _pair_buffer(self, slot: int, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        nbytes = self._span(info, start, stop)[1]
        if self._pair[slot].numel() < nbytes:
            self._pair[slot] = torch.empty(0, dtype=torch.uint8)  # let the old one go first
            self._pair[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._pair[slot]

    def _map(self, info: TensorInfo) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(info.path)
            if mm is not None:
                self._maps.move_to_end(info.path)
        if mm is None:
            with self.opened(info.path, info.stamp) as fd:
                size = os.fstat(fd).st_size
                if size == 0:
                    raise CheckpointError(f"{info.path}: is empty now: the file changed after its header was read")
                # ACCESS_COPY = MAP_PRIVATE: writable for torch.frombuffer (no read-only warning), but never
                # written, so every page stays backed by the file and the kernel can drop it.
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            with self._lock:
                self._maps[info.path] = mm
                while len(self._maps) > self.max_open:
                    self._maps.popitem(last=False)  # views keep their mapping alive; only our reference goes
        if info.offset + info.nbytes > len(mm):
            # touching pages past the end of the file would kill the process with SIGBUS
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r} lies past the end of the file: the file changed after its header "
                "was read; re-download it"
            )
        return mm

    def _view(self, info: TensorInfo, byte_start: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = info.torch_dtype
        if count == 0:
            # torch.frombuffer refuses count=0; an empty tensor owns no data anyway
            return torch.empty(shape, dtype=dtype)
        mm = self._map(info)
        # frombuffer keeps a reference to the mmap object, so the mapping outlives this reader if views do.
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=info.offset + byte_start)
        return t.view(shape)

    def rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 as a zero-copy memory-mapped view; a 0-d tensor has one row and comes back
        0-d. Not protected against the file shrinking later (use read_rows for that)."""
        begin, nbytes, shape = self._span(info, start, stop)
        return self._view(info, begin, nbytes // info.itemsize, shape)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor as a zero-copy memory-mapped view."""
        return self._view(info, 0, info.numel, info.shape)

    def release(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> None:
        """Tell the kernel we are done with this tensor's pages (or rows [start, stop) of it), so page cache and
        RSS stay low. Views stay valid: dropped pages are re-read from the file if touched again."""
        stop = info.rows if stop is None else stop
        first = info.offset + start * info.row_nbytes
        nbytes = min((stop - start) * info.row_nbytes, info.offset + info.nbytes - first)
        if nbytes <= 0:
            return
        with self._lock:
            mm = self._maps.get(info.path)
            fd = self._fds.get(info.path)
            if fd is not None:
                self._pins[info.path] = self._pins.get(info.path, 0) + 1  # not closed under our advice
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            # madvise needs a page-aligned start; widening the range is harmless: private pages we never wrote
            # are simply re-read from the file if a neighbour needs them again.
            page = mmap.PAGESIZE
            begin = first // page * page
            length = min(first + nbytes, len(mm)) - begin
            try:
                mm.madvise(mmap.MADV_DONTNEED, begin, length)
            except (OSError, ValueError):
                pass  # advice only
        if fd is not None:
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, first, nbytes, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only
            finally:
                self._unpin(info.path)

    def prefetch(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading this tensor's pages now (async readahead), so the merge of the
        tensor before it overlaps the disk read."""
        if not info.nbytes or not hasattr(os, "posix_fadvise"):
            return
        with self.opened(info.path, info.stamp) as fd:
            try:
                os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only

    def close(self) -> None:
        """Drop the mappings and close the fds.

        The mmaps are not closed explicitly: torch.frombuffer does not pin the buffer, so mmap.close() would unmap
        memory that live views still point to (a segfault on next access). Dropping our reference unmaps each file
        as soon as its last view is gone.
        """
        ahead, self._ahead = self._ahead, None
        if self._helper is not None:
            if ahead is not None:
                concurrent.futures.wait([ahead[1]], timeout=1.0)  # a read in flight still holds its fd
            self._helper.shutdown(wait=False)
            self._helper = None
        with self._lock:
            self._maps.clear()
            fds, self._fds = self._fds, OrderedDict()
            self._pins.clear()
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
