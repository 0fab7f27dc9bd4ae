"""Stream safetensors shards to disk without ever holding a shard (or a whole tensor) in memory.

The header is computed up front from names, dtypes and shapes alone, byte-for-byte what `safetensors.torch.
save_file` would write, so the data can follow in row blocks or as raw copies from the base files. A small state
machine refuses anything that would produce a broken file (wrong tensor, wrong order, wrong byte count).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError, OutputError, StreamMergeError
from .formats import DTYPES
from .output import output_error
from .sharding import DEFAULT_METADATA, PlannedTensor, header_bytes

# Small writes are coalesced; anything this big or bigger goes straight to the fd.
BUFFER_SIZE = 1 << 20
COPY_CHUNK = 8 << 20


class WriterStateError(StreamMergeError, ValueError):
    """A ShardWriter was used out of protocol (wrong tensor, order or byte count); the file would be broken."""


# ----------------------------------------------------------------------------------------------------------------
# the writer


class WriterState(enum.Enum):
    OPEN = "open"  # header written, data being appended
    CLOSED = "closed"  # complete, flushed and fsynced
    FAILED = "failed"  # an I/O error left the file in an unknown state; only abort() makes sense
    ABORTED = "aborted"  # closed and deleted


_CONTIGUOUS_FALLBACK_ERRNOS = {
    errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1),
}
_OUTPUT_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _as_bytes(data: torch.Tensor | bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of `data`, sharing its memory (no .tobytes() copies)."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            return memoryview(b"")
        # torch tensors do not export the buffer protocol and numpy is not a dependency: a ctypes array over
        # the tensor's memory does, and holding the tensor on it keeps that memory alive as long as the view
        buf = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
        buf._owner = t  # type: ignore[attr-defined]
        return memoryview(buf).cast("B")
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ShardWriter:
    """Writes one safetensors file: header at construction, then each tensor's bytes in `order`.

    With `any_order`, tensors may come in any order (each one's own bytes still in order): they are written at
    their planned offsets, so a caller can compute them in the order it reads its sources, or write a tensor
    whose bytes come before another's in the file after it.

    With `resume=(durable, tensors)` the file a killed run left is continued instead of created: its header must
    be the planned one, it is cut back to its first `durable` bytes (the end of its first `tensors` tensors, as
    `sync` reported them), and writing goes on with the next tensor.
    """

    def __init__(
        self, path: Path, tensors: Sequence[PlannedTensor], metadata: Mapping[str, str] | None = DEFAULT_METADATA,
        *, writeback: bool = False, any_order: bool = False, resume: tuple[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self._wb = None
        header, self.order = header_bytes(tensors, metadata)
        self._index = {t.name: i for i, t in enumerate(self.order)}
        self._total = len(header) + sum(t.nbytes for t in self.order)
        self.any_order = any_order
        self._start = [len(header)]  # file offset of each tensor's data
        for t in self.order[:-1]:
            self._start.append(self._start[-1] + t.nbytes)
        self._got = [0] * len(self.order)  # bytes of each tensor received
        self._pos = 0  # bytes handed to the sequential stream so far (buffered or written)
        self._high = 0  # end of the furthest bytes written to the file, for writeback
        self._cursor = 0  # index into order of the tensor being written
        self._done = 0  # bytes of order[cursor] received
        self._buf = bytearray()
        self.state = WriterState.OPEN
        self._fd = -1
        flags = (os.O_RDWR | os.O_NOFOLLOW) if resume else (os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except IsADirectoryError:
            raise OutputError(f"{self.path} is a directory: choose another --output") from None
        except OSError as exc:
            raise output_error(exc, self.path, self._total) from None
        try:
            if resume:
                self._continue(header, *resume)
            if writeback:
                from .writeback import Writeback

                self._wb = Writeback(self._fd)
            if not resume:
                self._put(memoryview(header))
        except BaseException:
            self.abort()
            raise

    def _continue(self, header: bytes, durable: int, tensors: int) -> None:
        """Take over a file whose first `tensors` tensors (`durable` bytes) were written and fsync'ed before."""
        if self.any_order or not 0 <= tensors <= len(self.order) or \
                durable != (self._start[tensors] if tensors < len(self.order) else self._total):
            raise WriterStateError(f"{self.path}: cannot resume after {tensors} tensors at byte {durable}")
        try:
            if os.pread(self._fd, len(header), 0) != header:
                raise WriterStateError(f"{self.path}: the file to resume has another header than planned")
            os.ftruncate(self._fd, durable)
            os.lseek(self._fd, durable, os.SEEK_SET)
        except OSError as exc:
            raise self._fail(exc) from None
        for i in range(tensors):
            self._got[i] = self.order[i].nbytes
        self._cursor, self._pos, self._high = tensors, durable, durable

    @property
    def position(self) -> int:
        """Bytes handed to the file so far in stream order (the header included)."""
        return self._pos

    def sync(self) -> tuple[int, int]:
        """Flush and fdatasync what was written; returns (bytes durable, leading tensors complete): what
        `resume=` takes to continue the file (in-order writers only)."""
        if self.any_order or self.state is not WriterState.OPEN:
            raise WriterStateError(f"{self.path}: sync needs an open in-order writer")
        self._flush()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._fail(exc) from None
        tensors = 0
        while tensors < len(self.order) and self._got[tensors] == self.order[tensors].nbytes:
            tensors += 1
        return (self._start[tensors] if tensors < len(self.order) else self._total), tensors

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def _advance_to(self, name: str, nbytes: int, *, tensor_dtype: torch.dtype | None = None) -> int:
        """Check `nbytes` more bytes of tensor `name` may come now; returns the file offset they go to. Raises
        before touching the file."""
        if self.state is not WriterState.OPEN:
            raise WriterStateError(f"{self.path}: cannot write tensor {name!r}: the writer is {self.state.value}")
        if self.any_order:
            if name not in self._index:
                raise WriterStateError(f"{self.path}: tensor {name!r} is not planned for this shard")
            i = self._index[name]
            self._check_bytes(self.order[i], self._got[i], nbytes, tensor_dtype)
            self._got[i] += nbytes
            return self._start[i] + self._got[i] - nbytes
        # finished tensors (including zero-byte ones) are passed over implicitly
        while (
            self._cursor < len(self.order)
            and self.order[self._cursor].name != name
            and self._done == self.order[self._cursor].nbytes
        ):
            self._cursor += 1
            self._done = 0
        if self._cursor == len(self.order) or self.order[self._cursor].name != name:
            if name not in self._index:
                raise WriterStateError(f"{self.path}: tensor {name!r} is not planned for this shard")
            if self._index[name] < self._cursor:
                raise WriterStateError(f"{self.path}: tensor {name!r} was already written; tensors come in .order")
            cur = self.order[self._cursor]
            raise WriterStateError(
                f"{self.path}: tensor {name!r} written out of order: {cur.name!r} still needs "
                f"{cur.nbytes - self._done} of {cur.nbytes} bytes; write tensors in .order"
            )
        cur = self.order[self._cursor]
        self._check_bytes(cur, self._done, nbytes, tensor_dtype)
        self._done += nbytes
        self._got[self._cursor] = self._done
        return self._start[self._cursor] + self._done - nbytes

    def _check_bytes(self, t: PlannedTensor, got: int, nbytes: int, tensor_dtype: torch.dtype | None) -> None:
        if tensor_dtype is not None and tensor_dtype not in (DTYPES[t.dtype], torch.uint8):
            raise WriterStateError(f"{self.path}: tensor {t.name!r} is planned as {t.dtype} but got {tensor_dtype}")
        if got + nbytes > t.nbytes:
            raise WriterStateError(
                f"{self.path}: tensor {t.name!r} got {got + nbytes} bytes but is planned as {t.dtype}"
                f"{list(t.shape)} = {t.nbytes} bytes"
            )

    def _fail(self, exc: OSError) -> OutputError:
        self.state = WriterState.FAILED
        # what is still to come: the header (if not yet out) and every tensor's missing bytes
        return output_error(exc, self.path, self._total - min(self._pos, self._start[0]) - sum(self._got))

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:  # pragma: no cover - PEP 475 retries, but be explicit
                continue
            except OSError as exc:
                raise self._fail(exc) from None
            view = view[n:]

    def _flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._write_all(memoryview(buf))

    def _pwrite_all(self, view: memoryview, at: int) -> None:
        while view:
            try:
                n = os.pwrite(self._fd, view, at)
            except InterruptedError:  # pragma: no cover
                continue
            except OSError as exc:
                raise self._fail(exc) from None
            view, at = view[n:], at + n
        self._high = max(self._high, at)

    def _put(self, view: memoryview) -> None:
        if len(self._buf) + len(view) <= BUFFER_SIZE:
            self._buf += view
        else:
            self._flush()
            if len(view) < BUFFER_SIZE:
                self._buf += view
            else:
                self._write_all(view)  # tensor-sized data goes straight to the fd
        self._pos += len(view)
        self._high = max(self._high, self._pos - len(self._buf))

    # -- public ---------------------------------------------------------------------------------------------------

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append the next bytes of tensor `name` (a whole tensor or one row block of it)."""
        view = _as_bytes(data)
        at = self._advance_to(name, len(view), tensor_dtype=data.dtype if isinstance(data, torch.Tensor) else None)
        if view:
            if at == self._pos:
                self._put(view)
            else:  # any_order: a tensor away from the end of the stream goes to its own place
                self._pwrite_all(view, at)
            self._writeback()

    def _stop_writeback(self) -> None:
        wb, self._wb = self._wb, None
        if wb is not None:
            wb.close()

    def _writeback(self) -> None:
        if self._wb is not None:
            try:
                self._wb.advance(self._high)
            except OSError as exc:
                raise self._fail(exc) from None

    def copy_from(self, name: str, src_fd: int, offset: int, nbytes: int) -> None:
        """Append `nbytes` of tensor `name` copied straight from `src_fd` at `offset` (kernel-side when possible)."""
        if nbytes < 0 or offset < 0:
            raise ValueError(f"copy_from({name!r}): negative offset or size")
        at = self._advance_to(name, nbytes)
        if at != self._pos:  # any_order: a tensor away from the end of the stream
            self._copy_at(name, src_fd, offset, nbytes, at)
            self._writeback()
            return
        self._flush()
        done = 0
        done = self._copy_kernel(src_fd, offset, nbytes, done, name)
        while done < nbytes:  # portable fallback
            chunk = self._pread(name, src_fd, offset + done, min(COPY_CHUNK, nbytes - done))
            self._write_all(memoryview(chunk))
            done += len(chunk)
        self._pos += nbytes
        self._high = max(self._high, self._pos)
        self._writeback()

    def _copy_at(self, name: str, src_fd: int, offset: int, nbytes: int, at: int) -> None:
        """Copy to file offset `at` without moving the stream: copy_file_range with both offsets, or pread/pwrite."""
        done = 0
        func = getattr(os, "copy_file_range", None)
        while func is not None and done < nbytes:
            try:
                n = func(src_fd, self._fd, min(nbytes - done, 1 << 30), offset + done, at + done)
            except InterruptedError:  # pragma: no cover
                continue
            except OSError as exc:
                if exc.errno in _CONTIGUOUS_FALLBACK_ERRNOS and exc.errno not in _OUTPUT_ERRNOS:
                    break
                raise self._fail(exc) from None
            if n == 0:
                raise self._short_source(name, src_fd, offset + done)
            done += n
        while done < nbytes:
            chunk = self._pread(name, src_fd, offset + done, min(COPY_CHUNK, nbytes - done))
            self._pwrite_all(memoryview(chunk), at + done)
            done += len(chunk)
        self._high = max(self._high, at + nbytes)

    def _pread(self, name: str, src_fd: int, at: int, count: int) -> bytes:
        """The next bytes of a raw copy's source, read in user space (where the kernel cannot copy)."""
        try:
            chunk = os.pread(src_fd, count, at)
        except OSError as exc:
            self.state = WriterState.FAILED
            raise CheckpointError(
                f"cannot read the source of tensor {name!r} (fd {src_fd}): {exc.strerror or exc}; "
                "check the base model files"
            ) from None
        if not chunk:
            raise self._short_source(name, src_fd, at)
        return chunk

    def _short_source(self, name: str, src_fd: int, at: int) -> CheckpointError:
        self.state = WriterState.FAILED
        return CheckpointError(
            f"source of tensor {name!r} (fd {src_fd}) ended at byte {at}: the base file changed or was truncated "
            "during the merge; re-download it"
        )

    def _copy_kernel(self, src_fd: int, offset: int, nbytes: int, done: int, name: str) -> int:
        """copy_file_range, then sendfile; returns how far they got (the caller finishes with pread/write)."""
        for method in ("copy_file_range", "sendfile"):
            func = getattr(os, method, None)
            if func is None:
                continue
            while done < nbytes:
                count = min(nbytes - done, 1 << 30)
                try:
                    if method == "copy_file_range":
                        n = func(src_fd, self._fd, count, offset + done)  # dst uses and advances the file position
                    else:
                        n = func(self._fd, src_fd, offset + done, count)
                except InterruptedError:  # pragma: no cover
                    continue
                except OSError as exc:
                    if exc.errno in _OUTPUT_ERRNOS:
                        raise self._fail(exc) from None
                    if exc.errno in _CONTIGUOUS_FALLBACK_ERRNOS:
                        break  # not supported for this pair of files: try the next method
                    raise self._fail(exc) from None
                if n == 0:
                    raise self._short_source(name, src_fd, offset + done)
                done += n
            if done >= nbytes:
                break
        return done

    def close(self) -> None:
        """Check every tensor got exactly its bytes, flush and fsync. An incomplete file is deleted."""
        if self.state is WriterState.CLOSED:
            return
        if self.state is not WriterState.OPEN:
            raise WriterStateError(f"{self.path}: cannot close: the writer is {self.state.value}")
        short = next(((t, got) for t, got in zip(self.order, self._got) if got != t.nbytes), None)
        if short is not None:
            self.abort()
            raise WriterStateError(
                f"{self.path}: tensor {short[0].name!r} got {short[1]} of its {short[0].nbytes} bytes when the shard "
                "was closed; the partial file was deleted"
            )
        self._flush()
        try:
            self._stop_writeback()  # its thread uses the fd: stop it before the fd goes
            os.fsync(self._fd)
        except OSError as exc:
            raise self._fail(exc) from None
        fd, self._fd = self._fd, -1  # close() releases the fd even when it fails: never close it twice
        try:
            os.close(fd)
        except OSError as exc:
            raise self._fail(exc) from None
        self.state = WriterState.CLOSED

    def abort(self) -> None:
        """Close and delete the partial file. Does nothing after a successful close()."""
        if self.state in (WriterState.CLOSED, WriterState.ABORTED):
            return
        self.state = WriterState.ABORTED
        self._buf = bytearray()
        try:
            self._stop_writeback()
        except OSError:
            pass  # the file is being deleted anyway
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass  # already gone, or nothing more we can do: the caller reports the original error

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
