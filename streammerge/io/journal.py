"""The resume journal: a small file in the staging folder recording each shard finished and fsync'ed (and, inside
the shard being written, the last durable tensor boundary), so a killed merge can go on with `--resume`.

The journal is only believed for the inputs it was written for: its fingerprint covers the streammerge code and
torch version, every base shard's header bytes and (inode, size, mtime), the adapter's config and weights file
(header bytes and stamp), the options that change bytes, and every planned shard header. Before a finished shard
is reused it is checked without reading it whole (re-reading 80 % of a 16 GB output costs as much as writing it):

* its size, inode, mtime and ctime are the ones recorded right after it was fsync'ed: any write, truncation,
  replacement or `touch` through the file system changes the ctime, which no one can set back;
* its header bytes equal the planned header exactly;
* a sha256 of 18 sampled chunks (first and last 256 KiB of the data and 16 spread between), recorded after the
  fsync, still matches: damage below the file system that kept the metadata shows up with good probability when
  it is larger than a few chunks.

A partial shard is checked the same way on its durable prefix (no stamp: the killed run kept writing after it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .output import output_error
from .sharding import DEFAULT_METADATA, PlannedTensor, header_bytes

if TYPE_CHECKING:
    from .staging import Staging

JOURNAL_NAME = ".streammerge-journal.json"
VERSION = 1
SAMPLES = 16
SAMPLE_BYTES = 256 * 1024


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A digest of everything the output bytes depend on (see `inputs_fingerprint`)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies an input file without reading it whole: its stamp and, for safetensors, its header."""
    st = os.stat(path)
    ident: dict[str, Any] = {"name": path.name, "stamp": [st.st_ino, st.st_size, st.st_mtime_ns]}
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            ident["header"] = hashlib.sha256(head + f.read(min(n, 100_000_000))).hexdigest()
        elif st.st_size <= 64 * 2**20:
            ident["sha256"] = hashlib.sha256(f.read()).hexdigest()
    return ident


def code_identity() -> dict[str, str]:
    """The streammerge version, a digest of its source files (a changed development checkout counts) and torch's
    version (its kernels decide the last bit)."""
    import torch

    from .. import __version__

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        digest.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return {"streammerge": __version__, "source": digest.hexdigest(), "torch": torch.__version__}


def sample_digest(fd: int, begin: int, end: int) -> str:
    """sha256 of sampled chunks of bytes [begin, end) of an open file: the first and last SAMPLE_BYTES and SAMPLES
    chunks spread evenly between (the whole range when it is small)."""
    digest = hashlib.sha256()
    span = end - begin
    if span <= (SAMPLES + 2) * SAMPLE_BYTES:
        offsets: Iterable[int] = range(begin, end, SAMPLE_BYTES)
    else:
        step = (span - SAMPLE_BYTES) / (SAMPLES + 1)
        offsets = [begin + int(i * step) for i in range(SAMPLES + 2)]
    for at in offsets:
        chunk = os.pread(fd, min(SAMPLE_BYTES, end - at), at)
        digest.update(at.to_bytes(8, "little") + chunk)
    return digest.hexdigest()


@dataclass
class Resumable:
    """What a journal lets a merge skip: shards to reuse whole, and per partial shard (durable bytes, tensors)."""

    complete: set[str] = field(default_factory=set)
    partial: dict[str, tuple[int, int]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)   # why recorded shards were not reused


class Journal:
    """The journal of one staging folder. `closed` and `checkpoint` run on the writer thread of the shard."""

    def __init__(self, folder: Path, fp: str, planned: Mapping[str, tuple[bytes, int]]) -> None:
        self.folder, self.fp, self.planned = folder, fp, planned   # shard name -> (header bytes, file size)
        self.shards: dict[str, dict[str, Any]] = {}
        self.partial: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # several writer threads may record at once

    @property
    def path(self) -> Path:
        return self.folder / JOURNAL_NAME

    def resume(self) -> Resumable:
        """Read the journal a killed run left and check every shard it records; keep what passes. Everything else
        in the folder (a foreign journal, unchecked files) is deleted, so the run starts from what is proven."""
        found = Resumable()
        recorded = self._load()
        keep = {JOURNAL_NAME}
        for name, entry in recorded.get("shards", {}).items():
            why = self._check_complete(name, entry)
            if why is None:
                found.complete.add(name)
                self.shards[name] = entry
                keep.add(name)
            else:
                found.rejected.append(f"{name}: {why}")
        for name, entry in recorded.get("partial", {}).items():
            if name in found.complete:
                continue
            why = self._check_partial(name, entry)
            if why is None:
                found.partial[name] = (int(entry["bytes"]), int(entry["tensors"]))
                self.partial[name] = entry
                keep.add(name)
            else:
                found.rejected.append(f"{name} (partial): {why}")
        for p in list(self.folder.iterdir()):
            if p.name not in keep:
                _remove(p)
        self._save()
        return found

    def start(self) -> None:
        """A new journal for an empty staging folder."""
        self._save()

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(16 * 2**20))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("fingerprint") != self.fp:
            return {}
        return data

    def _check_complete(self, name: str, entry: Any) -> str | None:
        if name not in self.planned or not isinstance(entry, dict):
            return "not planned"
        header, size = self.planned[name]

        def whole(st: os.stat_result) -> str | None:
            if st.st_size != size or st.st_size != entry.get("size"):
                return "size differs"
            if [st.st_ino, st.st_mtime_ns, st.st_ctime_ns] != entry.get("stamp"):
                return "changed since it was finished (inode, mtime or ctime)"
            return None

        return self._check_file(name, header, size, entry, whole)

    def _check_partial(self, name: str, entry: Any) -> str | None:
        if name not in self.planned or not isinstance(entry, dict):
            return "not planned"
        header, size = self.planned[name]
        durable = entry.get("bytes")
        if not isinstance(durable, int) or not len(header) <= durable <= size:
            return "bad record"

        def long_enough(st: os.stat_result) -> str | None:
            return "shorter than its durable part" if st.st_size < durable else None

        return self._check_file(name, header, durable, entry, long_enough)

    def _check_file(self, name: str, header: bytes, end: int, entry: Mapping[str, Any],
                    check_stat: Callable[[os.stat_result], str | None]) -> str | None:
        """Why shard `name` cannot be reused up to byte `end` (None: it can): a regular file passing `check_stat`,
        with the planned header and the sampled digest recorded in `entry`."""
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return "missing"
        try:
            st = os.fstat(fd)
            why = "not a regular file" if not stat.S_ISREG(st.st_mode) else check_stat(st)
            if why is not None:
                return why
            if os.pread(fd, len(header), 0) != header:
                return "header differs from the plan"
            if sample_digest(fd, len(header), end) != entry.get("samples"):
                return "sampled bytes differ"
        finally:
            os.close(fd)
        return None

    # -- recording (writer threads) ---------------------------------------------------------------------------------

    def closed(self, name: str) -> None:
        """Record shard `name` as finished: called after its writer fsync'ed and closed it."""
        header, size = self.planned[name]
        fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            entry = {"size": st.st_size, "stamp": [st.st_ino, st.st_mtime_ns, st.st_ctime_ns],
                     "samples": sample_digest(fd, len(header), size)}
        finally:
            os.close(fd)
        self.shards[name] = entry
        self.partial.pop(name, None)
        self._save()

    def checkpoint(self, name: str, durable: int, tensors: int) -> None:
        """Record that the first `durable` bytes of shard `name` (its first `tensors` tensors) are fsync'ed."""
        header, _ = self.planned[name]
        fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            samples = sample_digest(fd, len(header), durable)
        finally:
            os.close(fd)
        self.partial[name] = {"bytes": durable, "tensors": tensors, "samples": samples}
        self._save()

    def _save(self) -> None:
        """Replace the journal atomically and durably (write, fsync, rename, fsync the folder)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        data = memoryview(json.dumps({"version": VERSION, "fingerprint": self.fp, "shards": self.shards,
                                      "partial": self.partial}, sort_keys=True).encode())
        tmp = self.folder / (JOURNAL_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise output_error(e, self.path, len(data)) from None


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def open_journal(staging: Staging, base_files: Sequence[Path], adapter_files: Sequence[Path],
                 options: Mapping[str, Any], shards: list[list[PlannedTensor]], names: list[str],
                 say: Callable[[str], None]) -> tuple[Journal, Resumable]:
    """The journal of this merge's staging folder: started afresh, or (a folder `--resume` adopted) read back, with
    what of the killed run's shards passes the checks."""
    planned = {}
    for shard, name in zip(shards, names):
        header = header_bytes(shard, DEFAULT_METADATA)[0]
        planned[name] = (header, len(header) + sum(t.nbytes for t in shard))
    fp = fingerprint({
        "code": code_identity(), "options": dict(options),
        "base": [file_identity(Path(f)) for f in base_files],
        "adapter": [file_identity(Path(f)) for f in adapter_files],
        "shards": {name: hashlib.sha256(h).hexdigest() for name, (h, _) in planned.items()},
    })
    journal = Journal(staging.path, fp, planned)
    if not staging.adopted:
        if staging.resume:
            say("      resume: no unfinished merge of this output to continue; starting from the beginning")
        journal.start()
        return journal, Resumable()
    found = journal.resume()
    partial = sum(n for n, _ in found.partial.values())
    total = sum(size for _, size in planned.values())
    reused = sum(planned[n][1] for n in found.complete) + partial
    say(f"      resume: {len(found.complete)} of {len(names)} shard(s) reused"
        + (f", {len(found.partial)} continued" if found.partial else "")
        + f" ({reused / max(total, 1):.0%} of the bytes; checked: size, inode/mtime/ctime, header, sampled chunks)")
    for why in found.rejected[:5]:
        say(f"      resume: not reused: {why}")
    return journal, found
