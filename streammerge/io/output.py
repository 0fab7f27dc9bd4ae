"""The output folder, checked before any work is done: what --output may be, what --overwrite may replace, and
whether the planned bytes fit on its file system; and the one-line errors for a failed write."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from ..errors import OutputError
from ..memory import fmt_bytes
from .sidefiles import TOKENIZER_PATTERNS, WEIGHT_INDEXES, WEIGHT_SUFFIXES

STAGING_TAG = ".streammerge-tmp-"
LOCK_TAG = ".streammerge.lock"
# kept free beyond the planned bytes: file system metadata, and other writers on the same disk
SPACE_MARGIN = 64 * 2**20

# what a model folder holds: `--overwrite` replaces only folders made of these (see foreign_file)
_MODEL_FILES = (
    *(f"*{s}" for s in WEIGHT_SUFFIXES), *WEIGHT_INDEXES, *TOKENIZER_PATTERNS, "*config*.json", "*.jinja",
    "*.tiktoken", "*.model", "README.md", "LICENSE*", "NOTICE*", "USE_POLICY*", ".gitattributes",
)
# ... and, at the top of a folder that is evidently a model (config.json and weights), other JSON and remote code
_MODEL_FOLDER_TOP = ("*.json", "*.py")


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_TAG}"


def resolve_output(output: str | os.PathLike) -> Path:
    """The folder the merge will be written to, decided before any work.

    Refused outright: an empty --output (an unset shell variable), the root, a home folder, a folder that holds
    the current directory, and a mount point (the finished merge is renamed into place, which a mount point
    cannot take). A symbolic link at --output is followed to the folder it names; a dangling one is refused.
    """
    text = os.fspath(output)
    if not str(text).strip():
        raise OutputError("--output is empty (an unset shell variable?); pass the folder to write the merged "
                          "model to")
    path = Path(text).expanduser()
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise OutputError(f"{path}: --output is a symbolic link to {target}, which does not exist; create that "
                              "folder or pass another --output")
        path = target
    real = Path(os.path.realpath(path))
    never = "streammerge never replaces it; pass a new folder for the merged model"
    if real == Path(real.anchor):
        raise OutputError(f"{text}: --output is the root folder; {never}")
    if real in _home_folders(real):
        raise OutputError(f"{text}: --output is a home folder ({real}); {never}")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was deleted: nothing can contain it
        cwd = None
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise OutputError(f"{text}: --output {real} holds the current directory; {never}")
    if real.is_dir() and os.path.ismount(real):
        raise OutputError(f"{text}: --output {real} is a mount point: the merge is built beside it and renamed into "
                          "place, which a mount point cannot take; pass a folder inside it")
    return path


def _home_folders(real: Path) -> set[Path]:
    homes = set()
    try:
        homes.add(Path.home().resolve())
    except (RuntimeError, OSError):  # no HOME and no password entry
        pass
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]).resolve())
    try:
        import pwd

        homes.add(Path(pwd.getpwuid(real.stat().st_uid).pw_dir).resolve())  # e.g. ~otheruser
    except (ImportError, KeyError, OSError):
        pass
    return homes


def foreign_file(folder: Path, ours: Collection[str] = ()) -> str | None:
    """The first entry of `folder` (relative path, sorted) that is not part of a model output, or None.

    Part of a model output: weights, config and tokenizer files, model cards and licenses; remote code and
    other JSON at the top of a folder with config.json and weights; huggingface_hub's `.cache/huggingface`
    bookkeeping; and `ours`, the files this merge writes itself (the base's other files, copied). Anything else
    (a `.git` folder, sources, documents, a link to a folder) means the folder is not a model output.
    """
    top = os.listdir(folder)
    model = "config.json" in top and any(n.endswith((*WEIGHT_SUFFIXES, ".index.json")) for n in top)
    ours = set(ours)
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs.sort()
        if rel_root == Path(".cache"):
            others = sorted(set(dirs) - {"huggingface"}) + sorted(files)
            if others:
                return (rel_root / others[0]).as_posix()
            dirs[:] = []  # what huggingface_hub keeps about a download into this folder
            continue
        for d in dirs:
            rel = (rel_root / d).as_posix()
            if os.path.islink(os.path.join(root, d)) or (d.startswith(".") and rel != ".cache"):
                return rel + "/"
        allowed = _MODEL_FILES + (_MODEL_FOLDER_TOP if model and rel_root == Path(".") else ())
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if rel not in ours and not any(fnmatch.fnmatch(name, p) for p in allowed):
                return rel
    return None


def check_output(output: Path, overwrite: bool, inputs: tuple[Path, ...] = (), writes: Collection[str] | None = None
                 ) -> None:
    """Refuse outputs that cannot or must not be written, before any work is done.

    With `writes` (the files besides the weights this merge will write), an --overwrite of a folder that is not
    a model output is refused too.
    """
    for ancestor in output.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{output}: {ancestor} is a file, not a directory; choose another --output")
            break
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: --output exists and is a file, not a directory; choose another path")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(f"{output}: --output exists and is not empty; pass --overwrite to replace it or "
                              "choose another path")
        if writes is not None:
            refuse_foreign(output, writes)
    resolved = output.resolve()
    for src in inputs:
        src = src.resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(f"{output}: --output overlaps an input folder ({src}); write the merge elsewhere")
    parent = _existing_parent(output.absolute().parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: cannot write in {parent} (permission denied); choose another --output")


def refuse_foreign(output: Path, ours: Collection[str] = ()) -> None:
    try:
        foreign = foreign_file(output, ours)
    except OSError as e:
        raise OutputError(f"{output}: cannot read --output to check what --overwrite would replace "
                          f"({e.strerror}); choose another --output") from None
    if foreign is not None:
        raise OutputError(f"{output}: --overwrite only replaces a model folder, and {foreign} is not a model, "
                          "config or tokenizer file; remove it yourself or choose another --output")


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start when the planned output cannot fit on the file system the staging folder is on.

    Staging directories a killed run left beside the output count as free: this run deletes them before it
    writes (unless another live run holds the lock, in which case this run stops at the lock anyway).
    """
    where = _existing_parent(output.absolute().parent)  # the staging folder is a sibling of --output
    free = shutil.disk_usage(where).free
    stale = _stale_bytes(output)
    if free + stale < needed + SPACE_MARGIN:
        also = f" (+{fmt_bytes(stale)} in stale staging folders)" if stale else ""
        raise OutputError(
            f"{output}: not enough free disk space on {where}: the merge writes {fmt_bytes(needed)} and keeps a "
            f"safety margin of {SPACE_MARGIN // 2**20} MiB free; {fmt_bytes(free)} free{also}; free some space or "
            "choose another --output"
        )


def staging_dirs(output: Path) -> list[Path]:
    """This output's staging (and replaced-output) folders: `.NAME.streammerge-tmp-PID` / `...-old-PID`, NAME
    compared literally (an output named `m*` or `merged[12]` must never match another output's folders)."""
    prefix = f".{output.name}{STAGING_TAG}"
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    return [output.parent / n for n in sorted(names)
            if n.startswith(prefix) and re.fullmatch(r"(old-)?[0-9]+", n[len(prefix):])]


def _lock_is_free(lock: Path) -> bool:
    """True when no live run holds `lock` (or it does not exist)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return True
    except OSError:
        return False  # a symlink or unreadable: nothing proves the owner is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _stale_bytes(output: Path) -> int:
    """Disk space held by stale staging directories of `output` (0 while another run holds its lock)."""
    output = output.absolute()
    if not output.parent.is_dir() or not _lock_is_free(lock_path(output)):
        return 0
    total = 0
    for stale in staging_dirs(output):
        for path in [stale, *stale.rglob("*")]:
            try:
                st = path.lstat()
            except OSError:
                continue
            total += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
    return total


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def _gb(n: int) -> str:
    return f"{max(n, 1) / 1e9:.2f} GB"


def output_error(exc: OSError, path: Path, remaining: int = 0) -> OutputError:
    """One line for an OSError on the output: what happened to which file, and what to do."""
    code = exc.errno
    if code == errno.ENOSPC:
        msg = f"no space left on device while writing {path}: free at least {_gb(remaining)} or choose another --output"
    elif code == getattr(errno, "EDQUOT", -1):
        msg = (f"disk quota exceeded while writing {path}: free {_gb(remaining)} in your quota or choose another "
               "--output")
    elif code == errno.EROFS:
        msg = f"read-only file system while writing {path}: choose another --output"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied while writing {path}: choose a writable --output"
    elif code == errno.EFBIG:
        msg = f"file too large for the file system while writing {path}: use a smaller --max-shard-size"
    else:
        msg = f"cannot write {path}: {exc.strerror or exc}: check the output disk or choose another --output"
    err = OutputError(msg)
    err.errno = code
    return err


