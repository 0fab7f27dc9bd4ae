"""The output directory: checked before anything starts, built in a hidden staging directory beside it,
fsync'ed, and renamed into place only when complete. A killed merge leaves nothing at --output that looks
complete; the next run (which holds the lock) removes its stale staging directories."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from pathlib import Path

from .errors import OutputError

STAGING_TAG = ".streammerge-tmp-"


def check_output(output: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that cannot or must not be written, before any work is done."""
    for ancestor in output.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{output}: {ancestor} is a file, not a directory; choose another --output")
            break
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
    """Refuse to start when the planned output cannot fit on its filesystem.

    Staging directories a killed run left beside the output count as free: this run deletes them before it
    writes (unless another live run holds the lock, in which case this run stops at the lock anyway).
    """
    free = shutil.disk_usage(_existing_parent(output)).free
    stale = _stale_bytes(output)
    margin = 64 * 2**20
    if free + stale < needed + margin:
        also = f" (+{stale / 1e9:.2f} GB in stale staging folders)" if stale else ""
        raise OutputError(
            f"{output}: not enough free disk space: the merge writes {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            f"free{also}; free some space or choose another --output"
        )


def _stale_bytes(output: Path) -> int:
    """Disk space held by stale staging directories of `output` (0 while another run holds its lock)."""
    output = output.absolute()
    parent = output.parent
    if not parent.is_dir():
        return 0
    lock = parent / f".{output.name}.streammerge.lock"
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            return 0  # a live run: its staging folder is not stale
        finally:
            os.close(fd)
    total = 0
    for stale in parent.glob(f".{output.name}{STAGING_TAG}*"):
        for path in [stale, *stale.rglob("*")]:
            try:
                st = path.lstat()
            except OSError:
                continue
            total += st.st_blocks * 512 if path.is_file() else 0
    return total


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
        except OSError as e:
            raise OutputError(f"{self.output}: cannot create the output's folder ({e.strerror}); choose another "
                              "--output") from None
        self._lock()
        try:
            for stale in self.parent.glob(f"{self.prefix}*"):
                # a killed run's staging (or replaced) directory: we hold the lock, so nobody else is using it
                shutil.rmtree(stale, ignore_errors=True)
            self.path.mkdir()
        except OSError as e:
            self._unlock()
            raise OutputError(f"{self.output}: cannot create a staging folder in {self.parent} ({e.strerror}); "
                              "choose another --output") from None
        return self

    def _lock(self) -> None:
        """flock a lock file beside the output. flock dies with the process, so kill -9 never leaves a stale lock.

        The file is unlinked on release; a run that opened it just before that would lock an orphaned inode, so
        after locking we check the path still names the inode we hold, and retry otherwise.
        """
        for _ in range(100):
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise OutputError(f"{self.output}: cannot create the lock file {self._lock_path.name} in "
                                  f"{self.parent} ({e.strerror}); choose another --output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.output}: another streammerge run is writing this output (lock "
                                      f"{self._lock_path.name} is held); wait for it or choose another --output"
                                      ) from None
                raise OutputError(f"{self.output}: cannot lock {self._lock_path} ({e.strerror}); choose another "
                                  "--output") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._lock_path))
            except OSError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass  # the pid is informative only
                self._lock_fd = fd
                return
            os.close(fd)
        raise OutputError(f"{self.output}: could not acquire {self._lock_path}; another run keeps replacing it")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)  # while still holding it, so a waiting run re-checks the inode
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def commit(self) -> None:
        """fsync everything and move the staging directory to --output (replacing it when allowed).

        The output appears in one rename. A replaced output is swapped out atomically (renameat2 RENAME_EXCHANGE
        where available), so a kill at any instant leaves either the old output or the new one at --output.
        """
        try:
            for path in sorted(self.path.rglob("*"), reverse=True):  # files, then their folders
                _fsync_path(path)
            _fsync_path(self.path)
            if self.output.is_dir() and any(self.output.iterdir()):
                if not self.overwrite:
                    raise OutputError(f"{self.output}: appeared while merging; pass --overwrite or choose another "
                                      "path")
                if _exchange(self.path, self.output):
                    _fsync_path(self.parent)
                    shutil.rmtree(self.path, ignore_errors=True)  # now the old output
                    return
                old = self.parent / f"{self.prefix}old-{os.getpid()}"
                os.rename(self.output, old)
                os.rename(self.path, self.output)
                _fsync_path(self.parent)
                shutil.rmtree(old, ignore_errors=True)
                return
            if self.output.exists() and not self.output.is_dir():
                raise OutputError(f"{self.output}: a file appeared at --output while merging; choose another path")
            os.rename(self.path, self.output)  # onto nothing, or atomically over an empty folder
            _fsync_path(self.parent)
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"{self.output}: cannot move the finished merge into place ({e.strerror}); check "
                              "the output disk or choose another --output") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported: the caller falls back."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
