"""The output is built in a hidden staging folder beside --output, locked against a second merge into the same
place, fsync'ed, checked complete, and renamed into place. A killed merge leaves nothing at --output that looks
complete; the next run (which holds the lock) removes its stale staging folders, or, with `resume`, adopts the
one whose journal says what it holds (io/journal.py decides what of it may be reused)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import Interrupted, OutputError
from .journal import JOURNAL_NAME
from .output import STAGING_TAG, lock_path, refuse_foreign, staging_dirs


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them: a rename that publishes the output is
    never cut in half by Ctrl-C, and the interrupt that follows knows the output is in place."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only
        return
    caught: list[int] = []
    saved: dict[int, Any] = {sig: signal.signal(sig, lambda s, _f: caught.append(s))
                             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if caught:
            handler = saved[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(caught[0])


class Staging:
    """A hidden directory beside `output`, locked against a second merge into the same place.

    Files the merge writes are declared with `expect`; `commit` publishes the folder only when every one of them
    is there with its size. `published` says whether --output already holds the new merge (for messages).

    With `resume`, a staging folder a killed run left (its owner is provably gone: we hold the lock it held) is
    taken over when it has a journal (`adopted`), and an interrupt leaves the folder in place for the next
    `--resume` instead of removing it.
    """

    def __init__(self, output: Path, overwrite: bool, resume: bool = False) -> None:
        self.output = output.absolute()
        self.overwrite = overwrite
        self.resume = resume
        self.adopted = False
        self.kept = False  # an interrupt left the folder for --resume
        self.parent = self.output.parent
        self.prefix = f".{self.output.name}{STAGING_TAG}"
        self.path = self.parent / f"{self.prefix}{os.getpid()}"
        self.lock_path = lock_path(self.output)
        self._lock_fd: int | None = None
        self._expected: dict[str, int | None] = {}
        self._inode: tuple[int, int] | None = None
        self.entered = False
        self.replacing = False  # --output held a model before this merge
        self.published = False

    def __enter__(self) -> Staging:
        self.entered = True
        try:
            try:
                self.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.output}: cannot create the output's folder ({e.strerror}); choose "
                                  "another --output") from None
            self._lock()
            try:
                adopt = self._adoptable() if self.resume else None
                for stale in staging_dirs(self.output):
                    # a killed run's staging (or replaced) folder: we hold its output's lock, so its owner is gone
                    if stale == adopt:
                        continue
                    if stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
                if adopt is not None:
                    os.rename(adopt, self.path)
                    self.adopted = True
                else:
                    self.path.mkdir()
                st = os.stat(self.path)
                self._inode = (st.st_dev, st.st_ino)
            except OSError as e:
                raise OutputError(f"{self.output}: cannot create a staging folder in {self.parent} ({e.strerror}); "
                                  "choose another --output") from None
            self.replacing = self.output.is_dir() and any(self.output.iterdir())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _adoptable(self) -> Path | None:
        """The stale staging folder (not a replaced output) with the newest journal, if any."""
        best: tuple[int, Path] | None = None
        for d in staging_dirs(self.output):
            if d.name.startswith(f"{self.prefix}old-") or d.is_symlink() or not d.is_dir():
                continue
            try:
                st = os.lstat(d / JOURNAL_NAME)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (best is None or st.st_mtime_ns > best[0]):
                best = (st.st_mtime_ns, d)
        return best[1] if best else None

    def _lock(self) -> None:
        """flock a lock file beside the output. flock dies with the process, so kill -9 never leaves a stale lock.

        The lock path is never followed when it is a symbolic link (that would truncate whatever it points at).
        The file is unlinked on release; a run that opened it just before that would lock an orphaned inode, so
        after locking we check the path still names the inode we hold, and retry otherwise.
        """
        name = self.lock_path.name
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            try:
                fd = os.open(self.lock_path, flags, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP or self.lock_path.is_symlink():
                    raise OutputError(f"{self.output}: the lock file {self.lock_path} is a symbolic link; "
                                      "streammerge never writes through one: remove it and re-run") from None
                raise OutputError(f"{self.output}: cannot create the lock file {name} in {self.parent} "
                                  f"({e.strerror}); choose another --output") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"{self.output}: the lock file {self.lock_path} is not a regular file; remove it "
                                  "and re-run")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.output}: another streammerge run is writing this output (lock "
                                      f"{name} is held); wait for it or choose another --output") from None
                raise OutputError(f"{self.output}: cannot lock {self.lock_path} ({e.strerror}); choose another "
                                  "--output") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.lock_path))
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
        raise OutputError(f"{self.output}: could not acquire {self.lock_path}; another run keeps replacing it")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)  # while still holding it, so a waiting run re-checks the inode
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def expect(self, rel: str, size: int | None = None) -> None:
        """Declare that `rel` must be in the staging folder at commit, `size` bytes long (default: as it is now)."""
        if size is None:
            try:
                size = os.stat(self.path / rel).st_size
            except OSError:
                size = -1  # reported as missing at commit
        self._expected[rel] = size

    def _check_complete(self) -> None:
        """Every declared file is in the folder this run created, with its size: nothing else may publish."""
        problems = []
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._inode:
                problems.append("the folder itself was removed and re-created")
        except OSError:
            problems.append("the folder itself is gone")
        for rel, size in self._expected.items():
            try:
                st = os.lstat(self.path / rel)
            except OSError:
                problems.append(f"{rel} is missing")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel} is not a regular file")
            elif st.st_size != size:
                problems.append(f"{rel} is {st.st_size} bytes, {size} were written")
        if problems:
            raise OutputError(
                f"{self.output}: the finished merge is incomplete in its staging folder {self.path.name} "
                f"({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}): another process removed or "
                "changed files in it; nothing was published; re-run the merge"
            )

    def commit(self) -> None:
        """Check and fsync everything, then move the staging directory to --output (replacing it when allowed).

        The output appears in one rename. A replaced output is swapped out atomically (renameat2 RENAME_EXCHANGE
        where available), so a kill at any instant leaves either the old output or the new one at --output; an
        interrupt during the swap is delivered once it is done.
        """
        try:
            for scratch in (JOURNAL_NAME, JOURNAL_NAME + ".tmp"):  # the resume journal is not part of the output
                (self.path / scratch).unlink(missing_ok=True)
            self._check_complete()
            for path in sorted(self.path.rglob("*"), reverse=True):  # files, then their folders
                _fsync_path(path)
            _fsync_path(self.path)
            self._check_complete()
            if self.output.is_dir() and any(self.output.iterdir()):
                if not self.overwrite:
                    raise OutputError(f"{self.output}: appeared while merging; pass --overwrite or choose another "
                                      "path")
                refuse_foreign(self.output, [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")])
                with signals_deferred():
                    if _exchange(self.path, self.output):
                        self.published = self.replacing = True
                    else:
                        old = self.parent / f"{self.prefix}old-{os.getpid()}"
                        os.rename(self.output, old)
                        try:
                            os.rename(self.path, self.output)
                        except OSError:
                            os.rename(old, self.output)  # never leave --output empty
                            raise
                        self.published = self.replacing = True
                        self.path = old
                _fsync_path(self.parent)
                shutil.rmtree(self.path, ignore_errors=True)  # now the old output
                return
            if self.output.exists() and not self.output.is_dir():
                raise OutputError(f"{self.output}: a file appeared at --output while merging; choose another path")
            with signals_deferred():
                os.rename(self.path, self.output)  # onto nothing, or atomically over an empty folder
                self.published = True
            _fsync_path(self.parent)
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"{self.output}: cannot move the finished merge into place ({e.strerror}); check "
                              "the output disk or choose another --output") from None

    def interrupted_message(self) -> str:
        """What an interrupt (Ctrl-C, SIGTERM) left at --output, for the one line the CLI prints."""
        if self.published:
            replaced = "; the previous output was replaced" if self.replacing else ""
            return f"interrupted after the merge was complete: {self.output} holds the new merged model{replaced}"
        if self.kept:
            return (f"interrupted; {self.output} was left as it was; the finished shards stay in {self.path} for "
                    "the same command with --resume")
        if self.replacing:
            return f"interrupted; {self.output} was left as it was (the unfinished merge was removed)"
        if self.entered:
            return "interrupted; nothing was written to --output (its staging directory was removed)"
        return "interrupted; nothing was written to --output"

    @contextlib.contextmanager
    def reporting_interrupts(self) -> Iterator[None]:
        """Turn an interrupt anywhere in the block into Interrupted, with what it left at --output."""
        try:
            yield
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):
                raise
            raise Interrupted(self.interrupted_message()) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        # a Ctrl-C during the cleanup waits for it: never a staging folder or a lock file left behind
        with signals_deferred():
            try:
                if self.resume and exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and \
                        not self.published and (self.path / JOURNAL_NAME).is_file():
                    self.kept = True  # the lock goes with us: the next --resume may take the folder over
                elif self.path.is_symlink():
                    self.path.unlink()
                elif self.path.exists():
                    shutil.rmtree(self.path, ignore_errors=True)
            finally:
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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
