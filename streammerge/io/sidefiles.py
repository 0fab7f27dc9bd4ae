"""The non-weight files of the output: config (with dtype/tying/vocab fixed), tokenizer, templates, code."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from ..errors import AdapterError, CheckpointError
from .formats import DTYPE_NAMES  # noqa: F401  (re-exported)

# other serialisations of the weights: copying them would ship unmerged weights beside the merged ones
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".ot",
    ".tflite", ".mlmodel", ".pdparams",
)
WEIGHT_INDEXES = ("*.safetensors.index.json", "*.bin.index.json", "*.msgpack.index.json", "*.h5.index.json")
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "spiece.model", "sentencepiece*.model", "tokenizer.model", "chat_template*",
)


def _is_weight(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_SUFFIXES) or any(fnmatch.fnmatch(name, p) for p in WEIGHT_INDEXES)


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return any(p.startswith(".") for p in parts) or parts[-1].startswith("adapter_")


# files whose presence means a folder holds a whole tokenizer (not just a stray template)
TOKENIZER_CORE = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece*.model", "vocab.*",
    "merges.txt", "*.tiktoken",
)


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)


def _ships_tokenizer(names: list[str]) -> bool:
    return any(fnmatch.fnmatch(n, p) for n in names for p in TOKENIZER_CORE)


def _is_template(name: str) -> bool:
    return name.startswith("chat_template")


def _ships_template(root: Path, names: list[str]) -> bool:
    """A chat template in a file of its own, or inside tokenizer_config.json (which a base's separate
    chat_template.jinja would override when loaded)."""
    if any(_is_template(n) for n in names):
        return True
    try:
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def side_files(base_root: Path, adapter_root: Path) -> dict[str, Path]:
    """Relative output path -> source file: every non-weight file of the base, tokenizer files of the adapter
    replacing the base's (adapters saved after adding tokens carry the tokenizer that matches them).

    An adapter that ships a tokenizer replaces the base's tokenizer files as a set: a base file the adapter's
    tokenizer does not have (tokenizer.model beside a new tokenizer.json) would be stale, and loaders that
    prefer it (llama.cpp's converter) would read the old vocabulary. The chat template is the exception: the
    base's is kept unless the adapter brings one (as a file or in its tokenizer_config.json).

    A file that is a symlink out of its folder (other than into a Hugging Face cache's blobs/) is refused like a
    shard that points outside the model folder: a crafted repo must not get e.g. ~/.ssh copied into the output.
    """
    _refuse_special_files(base_root, adapter_root)
    files: dict[str, Path] = {}
    for path in sorted(base_root.rglob("*")):
        rel = path.relative_to(base_root).as_posix()
        if path.is_file() and not _skipped(rel) and not _is_weight(rel):
            files[rel] = _inside_or_refuse(path, base_root)
    ours = [p for p in sorted(adapter_root.iterdir()) if p.is_file() and is_tokenizer_file(p.name)]
    names = [p.name for p in ours]
    if _ships_tokenizer(names):
        keep_template = not _ships_template(adapter_root, names)
        files = {rel: src for rel, src in files.items()
                 if "/" in rel or not is_tokenizer_file(rel) or (keep_template and _is_template(rel))}
    for path in ours:
        files[path.name] = _inside_or_refuse(path, adapter_root)
    return files


def _refuse_special_files(base_root: Path, adapter_root: Path) -> None:
    """A file the output would get that is a FIFO, socket, device or broken link is refused: left out silently,
    the output would lack it (a FIFO config.json or tokenizer.json), and reading a FIFO blocks for ever."""
    wanted = [p for p in sorted(base_root.rglob("*")) if not _skipped(p.relative_to(base_root).as_posix())
              and not _is_weight(p.relative_to(base_root).as_posix())]
    wanted += [p for p in sorted(adapter_root.iterdir()) if is_tokenizer_file(p.name)]
    for path in wanted:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            kind = "a broken symbolic link"
        except OSError as e:
            kind = f"unreadable ({e.strerror})"
        else:
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file, so it cannot be copied into the merged "
                              "model; replace it with the real file or remove it")


def _inside_or_refuse(path: Path, root: Path) -> Path:
    from .checkpoint import allowed_dirs  # the same rule the shard index follows

    real = path.resolve()
    dirs = allowed_dirs(root)
    if not any(real == d or d in real.parents for d in dirs):
        raise CheckpointError(f"{path}: is a link to {real}, outside the model folder {root.resolve()}; copy the "
                              "file into the folder instead of linking it")
    return path


def copy_side_files(files: dict[str, Path], dest: Path) -> None:
    for rel, src in files.items():
        if rel == "config.json":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def updated_config(config: dict[str, Any], dtype_name: str | None, updates: dict[str, Any]) -> dict[str, Any]:
    """config.json for the output: dtype fields name the output dtype (top level and nested text configs),
    quantization_config is gone, and the plan's updates (tie_word_embeddings, vocab_size) are applied wherever
    the key already lives."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "quantization_config":
            continue
        if isinstance(value, dict):
            value = updated_config(value, dtype_name, updates)
        elif dtype_name is not None and key in ("torch_dtype", "dtype") and isinstance(value, str):
            value = dtype_name
        elif key in updates:
            value = updates[key]
        out[key] = value
    return out


def output_config(config: dict[str, Any], dtype_name: str | None, updates: dict[str, Any]) -> dict[str, Any]:
    """The whole config.json the output gets (what write_config writes, and what verify expects)."""
    new = updated_config(config, dtype_name, updates)
    if dtype_name is not None and "torch_dtype" not in new and "dtype" not in new:
        new["torch_dtype"] = dtype_name
    for key, value in updates.items():
        if not _has_key(new, key):
            new[key] = value
    return new


def write_config(src: Path | None, dest: Path, dtype_name: str | None, updates: dict[str, Any]) -> None:
    if src is None:
        return
    config = json.loads(src.read_text(encoding="utf-8"))
    new = output_config(config, dtype_name, updates)
    dest.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _has_key(config: dict[str, Any], key: str) -> bool:
    return key in config or any(isinstance(v, dict) and _has_key(v, key) for v in config.values())


def read_base_config(root: Path) -> dict[str, Any]:
    """config.json of the base, or {} when it has none."""
    path = root / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: base config.json is not valid JSON ({e}); re-download the base") from e
    except RecursionError:
        raise AdapterError(f"{path}: base config.json is nested too deeply to be a model config; re-download the "
                           "base") from None
    return data if isinstance(data, dict) else {}


def config_values(config: dict[str, Any], key: str) -> list[Any]:
    """`key` at the top level and in nested *_config dicts (text_config of vision-language models)."""
    found = [config[key]] if key in config else []
    for v in config.values():
        if isinstance(v, dict):
            found += config_values(v, key)
    return found
