"""What the output shards are: which tensors go in which file, the file names, each header's exact bytes (what
`safetensors.torch.save_file` writes), and the index."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .formats import DTYPES, ITEMSIZE, SAVE_ORDER
from .output import output_error

DEFAULT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})

# save_file's order (verified against safetensors.torch.save_file in tests/io/test_writer.py)
_DTYPE_RANK = {name: i for i, name in enumerate(SAVE_ORDER)}

@dataclass(frozen=True)
class PlannedTensor:
    """A tensor that will be written: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


# ----------------------------------------------------------------------------------------------------------------
# planning


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int,
                glued: Collection[str] = ()) -> list[list[PlannedTensor]]:
    """Split tensors greedily, in order, into shards of at most `max_shard_size` bytes of data.

    A tensor larger than the limit gets a shard of its own; a tensor named in `glued` always joins the shard of
    the tensor before it (a re-quantized weight's scale, written together with it). Always at least one shard
    (empty only if there are no tensors at all).
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size and t.name not in glued:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """transformers' shard names: model.safetensors, or model-00001-of-0000n.safetensors."""
    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def header_bytes(
    tensors: Sequence[PlannedTensor], metadata: Mapping[str, str] | None = DEFAULT_METADATA
) -> tuple[bytes, list[PlannedTensor]]:
    """The exact bytes (8-byte LE length + JSON header padded with spaces to a multiple of 8) that safetensors'
    save_file would write for these tensors, and the order the data must follow (save_file's order).

    Metadata keys are written in the mapping's order; safetensors itself uses a hash map there, so with more than
    one key its byte order is arbitrary (the parsed content is the same).
    """
    names = set()
    for t in tensors:
        if not isinstance(t.name, str) or t.name == "__metadata__":
            raise ValueError(f"invalid tensor name {t.name!r}")
        if t.name in names:
            raise ValueError(f"tensor {t.name!r} is planned twice")
        names.add(t.name)
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor {t.name!r}: unsupported dtype {t.dtype!r}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in t.shape):
            raise ValueError(f"tensor {t.name!r}: invalid shape {t.shape!r}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")

    order = sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    # serde_json's output: compact, raw UTF-8, the same escapes as Python's json with ensure_ascii=False
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_index(path: Path, shards: list[list[PlannedTensor]], names: list[str], metadata: dict | None = None) -> None:
    """Write model.safetensors.index.json as transformers does (sorted keys, indent 2) and fsync it."""
    if len(shards) != len(names):
        raise ValueError(f"{len(shards)} shards but {len(names)} file names")
    weight_map: dict[str, str] = {}
    total = 0
    for shard, file_name in zip(shards, names):
        for t in shard:
            if t.name in weight_map:
                raise ValueError(f"tensor {t.name!r} is planned in both {weight_map[t.name]} and {file_name}")
            weight_map[t.name] = file_name
            total += t.nbytes
    meta = dict(metadata or {})
    meta["total_size"] = total
    content = json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    path = Path(path)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise output_error(exc, path, len(content)) from None


