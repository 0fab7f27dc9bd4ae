"""The output directory: checked before anything starts, built in a hidden staging directory beside it,
fsync'ed, and renamed into place only when complete. A killed merge leaves nothing at --output that looks
complete; the next run (which holds the lock) removes its stale staging directories."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from .errors import OutputError

STAGING_TAG = ".streammerge-tmp-"


def check_output(output: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that cannot or must not be written, before any work is done."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: --output exists and is a file, not a directory; choose another path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"{output}: --output exists and is not empty; pass --overwrite to replace it or choose "
                          "another path")
    resolved = output.resolve()
    for src in inputs:
        src = src.resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(f"{output}: --output overlaps an input folder ({src}); write the merge elsewhere")
    parent = _existing_parent(output)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: cannot write in {parent} (permission denied); choose another --output")


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start when the planned output cannot fit on its filesystem."""
    free = shutil.disk_usage(_existing_parent(output)).free
    margin = 64 * 2**20
    if free < needed + margin:
        raise OutputError(
            f"{output}: not enough free disk space: the merge writes {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "free; free some space or choose another --output"
        )


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


class Staging:
    """A hidden directory beside `output`, locked against a second merge into the same place."""

    def __init__(self, output: Path, overwrite: bool) -> None:
        self.output = output.absolute()
        self.overwrite = overwrite
        self.parent = self.output.parent
        self.prefix = f".{self.output.name}{STAGING_TAG}"
        self.path = self.parent / f"{self.prefix}{os.getpid()}"
        self._lock_path = self.parent / f".{self.output.name}.streammerge.lock"
        self._lock_fd: int | None = None

    def __enter__(self) -> Staging:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.output}: cannot create the output's folder ({e.strerror}); choose another "
                              "--output") from e
        try:
            # flock dies with the process, so a kill -9 never leaves a stale lock behind
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(f"{self.output}: another streammerge run is writing this output; wait for it or "
                              "choose another --output") from e
        for stale in self.parent.glob(f"{self.prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path.mkdir()
        return self

    def commit(self) -> None:
        """fsync everything and move the staging directory to --output (replacing it when allowed)."""
        for path in self.path.rglob("*"):
            if path.is_file():
                _fsync_path(path)
        _fsync_path(self.path)
        old = None
        if self.output.exists():
            if any(self.output.iterdir()) and not self.overwrite:
                raise OutputError(f"{self.output}: appeared while merging; pass --overwrite or choose another path")
            old = self.parent / f"{self.prefix}old-{os.getpid()}"
            os.rename(self.output, old)
        os.rename(self.path, self.output)
        _fsync_path(self.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
