"""Anonymous memory of this process, sampled in the background: what a low-RAM machine actually pays.

File-backed pages of the memory-mapped shards are reclaimable page cache, so RSS would overstate the cost;
RssAnon (Linux) is the honest figure. Elsewhere psutil's RSS is the fallback.
"""

from __future__ import annotations

import threading

import psutil


def anon_bytes(pid: int | str = "self") -> int:
    """RssAnon of a process in bytes (RSS where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(None if pid == "self" else int(pid)).memory_info().rss


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if unit == "GB" else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


class MemoryMonitor:
    """Samples this process's anonymous memory every `interval` seconds and keeps the peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-memory", daemon=True)

    def current(self) -> int:
        value = anon_bytes()
        self.peak = max(self.peak, value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.current()

    def __enter__(self) -> MemoryMonitor:
        self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.current()
