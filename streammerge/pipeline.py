"""A small bounded pipeline: the main thread reads and computes row blocks, one background thread writes them.

torch kernels and file I/O both release the GIL, so on two cores the math of the next block overlaps the
write (and the disk's writeback) of the previous one. Output blocks live in a fixed pool of buffers that the
writer hands back once a block is on its way to disk, so memory is bounded by `depth` blocks whatever the
model's size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from collections.abc import Callable

import torch

# sync_file_range starts writeback of what was just written without waiting for it: the disk stays busy through
# the merge, dirty pages stay few, and the final fsync is short.
_SYNC_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages in the range, do not wait
_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux/glibc: fall back to fdatasync
    _sync_file_range = None


class BufferPool:
    """`count` byte buffers of `nbytes` each; `take` blocks until one is free."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:
            # a single row wider than a block (huge fused experts): a one-off buffer, never pooled
            return torch.empty(nbytes, dtype=torch.uint8)
        return self._free.get()

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.nbytes:
            self._free.put(buf)


class WriteBehind:
    """Runs write tasks in submission order on one thread; the first failure is re-raised in the caller.

    The writer thread polls its queue instead of waiting on it for ever, so `abort` can stop it even when an
    interrupt in the main thread left the queue's bookkeeping half-done (a lost wake-up would otherwise hang the
    process while it holds the output lock).
    """

    POLL = 0.05  # seconds between checks for abort while the queue is empty

    def __init__(self, pool: BufferPool, depth: int) -> None:
        self.pool = pool
        self._tasks: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-writer", daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[], None], buf: torch.Tensor | None = None) -> None:
        if self._error is not None:
            if buf is not None:
                self.pool.give(buf)
            raise self._error
        self._tasks.put((task, buf))

    def _run(self) -> None:
        while not self._abort.is_set():
            try:
                item = self._tasks.get(timeout=self.POLL)
            except queue.Empty:
                continue
            if item is None:
                return
            task, buf = item
            try:
                if self._error is None and not self._abort.is_set():
                    task()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e
            finally:
                if buf is not None:
                    self.pool.give(buf)

    def finish(self) -> None:
        """Wait for every submitted task; re-raise the first failure."""
        self._tasks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self, timeout: float = 1.0) -> bool:
        """Drop the queued tasks and wait at most `timeout` seconds for the one running; never blocks on the
        queue. True when the thread has stopped (False: it is still inside a task, e.g. a stalled write)."""
        self._abort.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Writeback:
    """Writeback of a file being written, on a thread of its own.

    Every `chunk` bytes it starts writeback of what was written (sync_file_range, which blocks while the device
    queue is full, so never on the writer thread) and drops from the page cache the range started a round
    earlier (pages still under writeback are simply kept by the kernel). The disk stays busy through the merge,
    dirty pages stay few, and the final fsync has little left to wait for.
    """

    def __init__(self, fd: int, chunk: int = 64 * 2**20) -> None:
        self.fd = fd
        self.chunk = chunk
        self._written = 0
        self._started = 0   # bytes whose writeback was started
        self._prev = 0      # where the previous round started
        self._dropped = 0   # bytes dropped from the page cache
        self._error: OSError | None = None
        self._stop = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="streammerge-writeback", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        """Record that `written` bytes are in the file (cheap: the work happens on the writeback thread)."""
        if self._error is not None:
            raise self._error
        if written - self._started >= self.chunk:
            with self._wake:
                self._written = written
                self._wake.notify()

    def close(self) -> None:
        """Stop the thread; re-raise a failure it met."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and self._written - self._started < self.chunk:
                    self._wake.wait()
                if self._stop:
                    return
                written = self._written
            try:
                self._round(written)
            except OSError as e:
                self._error = e
                return

    def _round(self, written: int) -> None:
        if _sync_file_range is None:
            os.fdatasync(self.fd)
        elif _sync_file_range(self.fd, self._started, written - self._started, _SYNC_WRITE) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if hasattr(os, "posix_fadvise") and self._prev > self._dropped:
            os.posix_fadvise(self.fd, self._dropped, self._prev - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._prev
        self._prev, self._started = self._started, written
