"""A small bounded pipeline: the main thread reads and computes row blocks, one background thread writes them.

torch kernels and file I/O both release the GIL, so on two cores the math of the next block overlaps the
write (and the disk's writeback) of the previous one. Output blocks live in a fixed pool of buffers that the
writer hands back once a block is on its way to disk, so memory is bounded by `depth` blocks whatever the
model's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch


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
            except BaseException as e:
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


