"""Writeback of a file being written, on a thread of its own: the disk stays busy through the merge, dirty pages
stay few, and the final fsync has little left to wait for."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Any

# sync_file_range starts writeback of what was just written without waiting for it: the disk stays busy through
# the merge, dirty pages stay few, and the final fsync is short.
_SYNC_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages in the range, do not wait
_sync_file_range: Any = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux/glibc: fall back to fdatasync
    pass


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
