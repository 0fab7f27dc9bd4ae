"""A model folder: the shard index (`model.safetensors.index.json`) or a single `model.safetensors` is the only
source of truth about which files belong to the model; every path is checked to stay inside the folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, MissingFileError
from .formats import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
from .safetensors import TensorInfo, read_header


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a (possibly sharded) safetensors checkpoint, without any data loaded."""

    root: Path
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]
    index_path: Path | None


def allowed_dirs(root: Path) -> list[Path]:
    """Directories shard files may resolve into: the model folder, and the blob store of a Hugging Face cache.

    A hub cache snapshot (`.../snapshots/<rev>/`) holds symlinks into `../../blobs/`, written by huggingface_hub
    itself; refusing those would refuse every cached model.
    """
    real = root.resolve()
    dirs = [real]
    if real.parent.name == "snapshots":
        dirs.append(real.parent.parent / "blobs")
    return dirs


def _inside(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in dirs)


def _shard_path(root: Path, index_path: Path, name: object, tensor: str) -> Path:
    fix = "the index is corrupt or malicious; re-download the model"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index_path}: weight_map[{tensor!r}] = {name!r} is not a file name: {fix}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{index_path}: weight_map[{tensor!r}] = {name!r} points outside the model folder: {fix}"
        )
    path = root / rel
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # symlink loops
        raise CheckpointError(f"{index_path}: shard {name!r} cannot be resolved (symlink loop?): {fix}") from None
    if not _inside(real, allowed_dirs(root)):
        raise CheckpointError(
            f"{index_path}: shard {name!r} resolves to {real}, outside the model folder {root.resolve()}: {fix}"
        )
    return path


def _read_index(root: Path, index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{index_path}: not a readable JSON file: re-download the model") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: has no \"weight_map\" object: re-download the model")
    if not weight_map:
        raise CheckpointError(f"{index_path}: \"weight_map\" lists no tensors: re-download the model")
    return weight_map


def _missing_weights_error(root: Path) -> MissingFileError:
    bins = sorted(p.name for p in root.glob("*.bin"))
    if bins:
        return MissingFileError(
            f"{root}: has {bins[0]}{' and more' if len(bins) > 1 else ''} but no {SAFETENSORS_SINGLE_FILE}: "
            "streammerge reads safetensors only; convert first, e.g. load the model with transformers and "
            "save_pretrained(dir, safe_serialization=True), or use the Hub's 'Convert to safetensors' Space"
        )
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if others:
        return MissingFileError(
            f"{root}: has {', '.join(others[:3])} but neither {SAFETENSORS_SINGLE_FILE} nor {SAFETENSORS_INDEX_FILE}: "
            f"rename a single-file checkpoint to {SAFETENSORS_SINGLE_FILE} or add the index"
        )
    return MissingFileError(
        f"{root}: no {SAFETENSORS_SINGLE_FILE} or {SAFETENSORS_INDEX_FILE}: point to the folder that holds the model "
        "weights"
    )


def open_checkpoint(root: Path | str) -> Checkpoint:
    """Read and cross-check every header of the checkpoint in `root` (single file or sharded with an index)."""
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"{root}: model folder does not exist: check the path")
    if not root.is_dir():
        raise MissingFileError(f"{root}: is not a folder: pass the folder that holds the model's safetensors files")

    single = root / SAFETENSORS_SINGLE_FILE
    index_path = root / SAFETENSORS_INDEX_FILE
    # transformers loads model.safetensors when it exists, even next to an index; follow it.
    if single.is_file():
        return Checkpoint(root, read_header(single)[0], (single,), None)
    if not index_path.is_file():
        raise _missing_weights_error(root)

    weight_map = _read_index(root, index_path)
    disagree = "the index and shards disagree: re-download the model"
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        _shard_path(root, index_path, shard, tensor)
        by_shard.setdefault(shard, []).append(tensor)

    tensors: dict[str, TensorInfo] = {}
    files: list[Path] = []
    for shard in sorted(by_shard):
        path = root / shard
        if not path.is_file():
            raise MissingFileError(f"{path}: shard listed in {index_path.name} is missing: re-download the model")
        infos, _ = read_header(path)
        listed = set(by_shard[shard])
        for name in by_shard[shard]:
            if name not in infos:
                raise CheckpointError(f"{path}: tensor {name!r} is listed for this shard but not in it: {disagree}")
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is also in {tensors[name].path.name}: {disagree}"
                )
            if name not in listed:
                where = f"listed under {weight_map[name]}" if name in weight_map else f"not in {index_path.name}"
                raise CheckpointError(f"{path}: tensor {name!r} is in this shard but {where}: {disagree}")
            tensors[name] = info
        files.append(path)
    return Checkpoint(root, tensors, tuple(files), index_path)


