"""Reading tensor data from shard files.

The merge reads with pread into buffers it reuses (a memory map would kill the process with SIGBUS if the file
were truncated during the merge), re-checking each file's size and mtime against those its header was read with.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingFileError
from .safetensors import TensorInfo, nofile_limit, open_error


def _changed(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file changed after its header was read (truncated, rewritten or replaced during the merge); "
        "re-run once the model files are complete and nothing writes to them"
    )


def _max_open() -> int:
    """Shard files a reader keeps open: a small share of the process's descriptor limit."""
    return max(4, min(128, nofile_limit() // 8))


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
