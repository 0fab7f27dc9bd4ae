"""What every quantized format gives the merge: the logical tensors a checkpoint's quantized groups stand for, their
rows dequantized to float32, and (FP8 formats) a re-quantizer for the merged rows.

A quantized weight is one *logical* tensor (the name, shape and values transformers' dequantized model has) made
of several disk tensors (packed data, scales, code books, a packed description). Planning sees only the logical
tensor; its companions are consumed by it, never cast or copied on their own. The values a format's `RowSource`
returns are exactly the float32 tensor transformers builds when it loads the checkpoint dequantized in float32:
the merge adds its delta to them and rounds once, as it does for a full-precision base.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ...errors import CheckpointError
from ..formats import DTYPES, TORCH_TO_ST

if TYPE_CHECKING:
    from ..quantized import QuantGroup
    from ..reader import TensorReader
    from ..safetensors import TensorInfo


class RowSource(Protocol):
    """Rows of one logical tensor, dequantized."""

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of dim 0 as float32 `[r1 - r0, prod(shape[1:])]` (valid until the next call)."""
        ...


@dataclass
class RequantReport:
    """How far re-quantization moved one merged tensor from its float32 merge (filled in by the engine, from
    several compute threads: `add` is thread-safe; the mean's last bits may depend on the order blocks end in)."""

    name: str
    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    max_value: float = 0.0     # largest |value| of the float32 merge, to read the error against
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    def add(self, err: torch.Tensor, w: torch.Tensor) -> None:
        """Count a block: `err` the re-quantized minus the merged values (overwritten), `w` the merged values."""
        if not err.numel():
            return
        err.abs_()
        top, total, n = float(err.amax()), float(err.sum()), err.numel()
        lo, hi = torch.aminmax(w)
        with self._lock:
            self.max_abs = max(self.max_abs, top)
            self.sum_abs += total
            self.count += n
            self.max_value = max(self.max_value, float(hi), -float(lo))


class RequantSession(Protocol):
    """One tensor's re-quantization, with its working buffers (dropped with the session)."""

    def observe(self, w: torch.Tensor, r0: int, r1: int) -> None:
        """See merged rows before any is quantized (`Requantizer.whole_tensor`: one scale covers every row)."""
        ...

    def quantize(self, w: torch.Tensor, r0: int, r1: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the float32 rows `w` into `q` (F8_E4M3, same shape); returns (the scale rows, in the scale's
        dtype, the dequantized rows q * scale in float32 for the error report)."""
        ...


class Requantizer(Protocol):
    """Turns float32 row blocks of a merged tensor into the base's quantization, with fresh scales."""

    scale: TensorInfo           # the base's scale tensor: the output's has the same name, dtype and shape
    row_align: int              # blocks start on multiples of this (a block of rows shares its scales)
    whole_tensor: bool          # the scale covers every row: the session observes every block before quantizing

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The rows of the scale tensor rows [r0, r1) of the weight write (whole-tensor scales: (0, 1) once)."""
        ...

    def session(self) -> RequantSession: ...


@dataclass(frozen=True, eq=False)
class QuantTensor:
    """One logical tensor of a quantized checkpoint and the disk tensors (by role) it is made of."""

    name: str                           # as transformers' dequantized model names it
    shape: tuple[int, ...]
    dtype: str                          # what `--dtype auto` writes it in: the dtype transformers dequantizes to
    fmt: QuantFormat
    parts: Mapping[str, TensorInfo]     # role -> disk tensor; the first is the packed data
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> TensorInfo:
        return next(iter(self.parts.values()))

    @property
    def disk_names(self) -> list[str]:
        return [p.name for p in self.parts.values()]

    def rows(self, reader: TensorReader) -> RowSource:
        return self.fmt.open_rows(self, reader)

    def describe(self) -> str:
        return f"dequantize({self.fmt.name})"


class QuantFormat:
    """One quantization format. Subclasses read their groups (`tensors`) and rows (`open_rows`); FP8 formats
    also re-quantize (`requantizer`)."""

    name: str = ""
    # what a --dtype keep merge of a tensor in this format would need and why it is not done, or "" if it is
    keep_refusal: str = ""

    def accepts(self, scheme: str) -> bool:
        """Whether this format reads checkpoints config.json describes as `scheme` (`io.quantized.config_scheme`)."""
        raise NotImplementedError

    def tensors(self, groups: list[QuantGroup], disk: Mapping[str, TensorInfo], config: Mapping[str, Any],
                root: Path) -> list[QuantTensor]:
        """The logical tensor of each group; CheckpointError/UnsupportedError for a group it cannot read."""
        raise NotImplementedError

    def open_rows(self, qt: QuantTensor, reader: TensorReader) -> RowSource:
        raise NotImplementedError

    def row_align(self, qt: QuantTensor) -> int:
        return 1

    def requantizer(self, qt: QuantTensor) -> Requantizer:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class QuantRole:
    """What an output tensor has to do with a quantized group (`OutTensor.quant`).

    * rows from `tensor`, dequantized (`requant` and `scale_of` None): the full-precision output;
    * `requant`: keep mode, the merged rows re-quantized into `tensor`'s scheme; the new scale is written with them;
    * `scale_of`: keep mode, this output is the new scale of that weight (written by the weight's emitter).
    """

    tensor: QuantTensor
    requant: Requantizer | None = None
    scale_of: str | None = None
    report: RequantReport | None = None

    @property
    def dequantizes(self) -> bool:
        return self.scale_of is None


class Buffers:
    """Byte buffers reused from block to block (grown when a block needs more)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(name, None)  # let the old one go first
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._bufs[name] = buf
        return buf[:nbytes]

    def f32(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.get(name, math.prod(shape) * 4).view(torch.float32).view(shape)


def read(reader: TensorReader, bufs: Buffers, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a (small) companion tensor, into a buffer of its own."""
    n = (r1 - r0) * info.row_nbytes if info.shape else info.nbytes
    return reader.read_rows(info, r0, r1, bufs.get(info.name, n))


def model_dtype(config: Mapping[str, Any], default: str = "BF16") -> str:
    """The safetensors dtype config.json names for the model (`torch_dtype` / `dtype`, top level or text config)."""
    for holder in (config, config.get("text_config") or {}):
        if not isinstance(holder, Mapping):
            continue
        for key in ("torch_dtype", "dtype"):
            name = holder.get(key)
            if isinstance(name, str):
                dt = getattr(torch, name.removeprefix("torch."), None)
                if isinstance(dt, torch.dtype) and dt in (torch.bfloat16, torch.float16, torch.float32):
                    return TORCH_TO_ST[dt]
    return default


def read_json_tensor(info: TensorInfo, reader: TensorReader) -> dict[str, Any]:
    """A small U8 tensor holding UTF-8 JSON (bitsandbytes' packed quant_state), parsed."""
    raw = reader.read_rows(info, 0, info.rows)
    try:
        data = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{info.path}: tensor {info.name!r} should hold JSON (the quantization state) but "
                              "does not; the checkpoint is damaged, re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{info.path}: tensor {info.name!r} holds {type(data).__name__}, not the JSON object "
                              "of a quantization state; the checkpoint is damaged, re-download it")
    return data


def torch_dtype(st: str) -> torch.dtype:
    return DTYPES[st]
