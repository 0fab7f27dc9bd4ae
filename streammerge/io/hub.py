"""`--base` / `--adapter` as a local folder or a Hugging Face repo id.

A local path wins. A repo id goes through huggingface_hub's snapshot_download, which honours HF_HUB_OFFLINE,
HF_HUB_CACHE / HF_HOME and the token; only the files the merge needs are fetched (the base's index first,
then exactly the shards it lists).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import HubError, MissingFileError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

SIDE_PATTERNS = [
    "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md", "tokenizer*", "vocab*", "merges*",
]


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~")) and ".." not in text


def resolve(source: str | Path, kind: str, token: str | None = None) -> Path:
    """A local folder for `source` (kind is 'base' or 'adapter'), downloading into the HF cache if needed."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not looks_like_repo_id(text):
        raise MissingFileError(f"{text}: --{kind} not found: no such folder, and not a Hugging Face repo id")
    if kind == "adapter":
        folder = _download(text, kind, token, ["adapter_config.json", "adapter_model.safetensors", *SIDE_PATTERNS])
        if not (folder / "adapter_model.safetensors").exists():
            folder = _download(text, kind, token, ["adapter_config.json", "adapter_model.bin", *SIDE_PATTERNS])
        return folder
    folder = _download(text, kind, token, ["model.safetensors.index.json", *SIDE_PATTERNS])
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HubError(f"{text}: its model.safetensors.index.json is malformed ({e}); report it to the repo "
                           "owner") from e
        return _download(text, kind, token, ["model.safetensors.index.json", *SIDE_PATTERNS, *shards])
    return _download(text, kind, token, ["model.safetensors", *SIDE_PATTERNS])


def _download(repo_id: str, kind: str, token: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, token=token))
    except GatedRepoError as e:
        raise HubError(f"{repo_id}: the --{kind} repo is gated; accept its terms on the Hub, then pass "
                       "--hf-token or set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{repo_id}: --{kind} repo not found (or private); check the id, or pass --hf-token for a "
                       "private repo") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{repo_id}: revision not found for --{kind}") from e
    except LocalEntryNotFoundError as e:
        raise HubError(f"{repo_id}: --{kind} is not in the local Hugging Face cache and the Hub cannot be reached "
                       "(offline, HF_HUB_OFFLINE=1, or no network); download it first or pass a local folder") from e
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: the Hub refused the --{kind} download ({_redact(str(e), token)}); check the id "
                       "and --hf-token") from e
    except OSError as e:
        raise HubError(f"{repo_id}: downloading --{kind} failed ({_redact(str(e), token)})") from e
    except ValueError as e:  # HFValidationError: not a valid repo id after all
        raise HubError(f"{repo_id}: not a valid Hugging Face repo id for --{kind} ({_redact(str(e), token)}); pass "
                       "a local folder or an id like org/name") from e


def _redact(text: str, token: str | None) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.replace(token, "***") if token else first
