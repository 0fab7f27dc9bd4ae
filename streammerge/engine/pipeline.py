"""A small bounded pipeline: the main thread reads row blocks, compute threads merge them, writer threads write
them, each writer in the order its blocks were submitted.

torch kernels and file I/O both release the GIL, so the threads really run at once. Blocks live in fixed pools
of buffers that come back once a block is written, so memory is bounded by the pools, whatever the model's size.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from .rows import Workspace


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


class Countdown:
    """Runs `done` once `count` parties have called `tick` (from any thread): a source block shared by several
    outputs goes back to its pool after the last of them is written."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left, self._done = count, done
        self._lock = threading.Lock()
        if count <= 0:
            done()

    def tick(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._done()


class ComputePool:
    """`threads` threads computing row blocks; each has a `Workspace` of its own that `submit`'s function gets
    as the keyword `ws`. Daemon threads: an interrupted merge never waits for them to exit."""

    def __init__(self, threads: int) -> None:
        self._tasks: queue.Queue[Any] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"streammerge-compute-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args))
        return future

    def _run(self) -> None:
        ws = Workspace()
        while True:
            item = self._tasks.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, ws=ws))
            except BaseException as e:  # handed to whoever waits for the block
                future.set_exception(e)

    def close(self) -> None:
        """Cancel what has not started and let the threads end (blocks being computed finish on their own)."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)


class WriteBehind:
    """Runs tasks in submission order on one thread. A task that raises stops the ones after it (their `cleanup`
    still runs); the first failure is re-raised in the caller by `submit` or `finish`.

    The thread polls its queue instead of waiting on it for ever, so `abort` can stop it even when an interrupt in
    the main thread left the queue's bookkeeping half-done (a lost wake-up would otherwise hang the process while
    it holds the output lock).
    """

    POLL = 0.05  # seconds between checks for abort while the queue is empty

    def __init__(self, depth: int, name: str = "streammerge-writer") -> None:
        self._tasks: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        if self._error is not None:
            if cleanup is not None:
                cleanup()
            raise self._error
        self._tasks.put((task, cleanup))

    def wait(self, future: concurrent.futures.Future) -> Any:
        """The result of `future` (a computed block), for a task on this thread: abortable while it waits."""
        while True:
            try:
                return future.result(timeout=self.POLL)
            except concurrent.futures.TimeoutError:
                if self._abort.is_set():
                    raise concurrent.futures.CancelledError from None

    def _run(self) -> None:
        while not self._abort.is_set():
            try:
                item = self._tasks.get(timeout=self.POLL)
            except queue.Empty:
                continue
            if item is None:
                return
            task, cleanup = item
            try:
                if self._error is None and not self._abort.is_set():
                    task()
            except BaseException as e:
                self._error = e
            finally:
                if cleanup is not None:
                    try:
                        cleanup()
                    except BaseException as e:
                        self._error = self._error or e

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
