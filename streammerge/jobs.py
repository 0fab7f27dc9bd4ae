"""Batch job files: one base, several adapters (or weighted combinations of adapters), one output each.

    {"base": "Qwen/Qwen3-1.7B", "dtype": "bf16",
     "jobs": [{"adapter": "./lora-a", "output": "./merged-a"},
              {"adapters": ["./lora-a", "./lora-b"], "weights": [0.7, 0.3], "output": "./merged-ab"}]}

The same in YAML or TOML (`[[jobs]]` tables). Options at the top level (`dtype`, `loader`, `max_shard_size`,
`max_memory`, `overwrite`, `clamp_f16`, `threads`) apply to every job. Relative paths are relative to the job
file's folder. `resources` (`{"num_cpus": 2, "memory": "8GB"}`), at the top level or in a job, is what a job
asks a cluster for when the batch runs distributed (`--ray`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

OPTIONS = ("dtype", "loader", "max_shard_size", "max_memory", "overwrite", "clamp_f16", "threads")
_JOB_FIELDS = ("adapter", "adapters", "weights", "output", "name", "resources")
_RESOURCES = ("num_cpus", "memory")


@dataclass(frozen=True)
class Resources:
    """What one job asks a cluster for (None: derived from the job)."""

    num_cpus: float | None = None
    memory: int | None = None   # bytes


@dataclass(frozen=True)
class Job:
    """One output: an adapter, or a weighted combination of adapters, merged into the batch's base."""

    adapters: tuple[str, ...]
    output: str
    weights: tuple[float, ...] | None = None
    name: str = ""
    resources: Resources | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.output).name


@dataclass(frozen=True)
class BatchSpec:
    """A parsed job file: the base, the jobs, and the options every job shares."""

    base: str
    jobs: tuple[Job, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources | None = None


@dataclass
class JobResult:
    """What one job of a batch came to: its summary, or the error that stopped it (and its exit code)."""

    job: Job
    ok: bool
    exit_code: int = 0
    error: str | None = None
    summary: Any = None   # MergeSummary when ok
    attempts: int = 1


def load_jobs(path: str | Path) -> BatchSpec:
    """Read and check a job file (.json, .yaml/.yml or .toml)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: job file not found; pass a JSON, YAML or TOML file")
    data = _parse(path)
    return parse_jobs(data, path)


def parse_jobs(data: Any, where: Path) -> BatchSpec:
    """A BatchSpec from the job file's contents (`where` names it in messages and anchors relative paths)."""
    def bad(what: str) -> InputError:
        return InputError(f"{where}: {what}; see `streammerge batch --help` for the format")

    if not isinstance(data, Mapping):
        raise bad("expected an object with 'base' and 'jobs'")
    unknown = sorted(set(data) - {"base", "jobs", "resources", *OPTIONS})
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise bad("'base' must be a folder or repo id")
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, Sequence) or isinstance(raw_jobs, str) or not raw_jobs:
        raise bad("'jobs' must be a non-empty list")
    root = where.parent
    jobs = tuple(_job(j, i, root, bad) for i, j in enumerate(raw_jobs))
    outputs = [Path(j.output).resolve() for j in jobs]
    if len(set(outputs)) != len(outputs):
        raise bad("two jobs write the same output")
    return BatchSpec(_local(base, root), jobs, {k: data[k] for k in OPTIONS if k in data},
                     _resources(data.get("resources"), "resources", bad))


def _job(raw: Any, i: int, root: Path, bad: Any) -> Job:
    if not isinstance(raw, Mapping):
        raise bad(f"jobs[{i}] must be an object")
    unknown = sorted(set(raw) - set(_JOB_FIELDS))
    if unknown:
        raise bad(f"jobs[{i}]: unknown field(s) {unknown}")
    if ("adapter" in raw) == ("adapters" in raw):
        raise bad(f"jobs[{i}]: give exactly one of 'adapter' or 'adapters'")
    adapters = [raw["adapter"]] if "adapter" in raw else raw["adapters"]
    if not isinstance(adapters, Sequence) or isinstance(adapters, str) or not adapters or \
            not all(isinstance(a, str) and a for a in adapters):
        raise bad(f"jobs[{i}]: 'adapters' must be a non-empty list of folders or repo ids")
    weights = raw.get("weights")
    if weights is not None:
        if not isinstance(weights, Sequence) or len(weights) != len(adapters) or \
                not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise bad(f"jobs[{i}]: 'weights' must be one number per adapter")
        weights = tuple(float(w) for w in weights)
    output = raw.get("output")
    if not isinstance(output, str) or not output:
        raise bad(f"jobs[{i}]: 'output' must be a folder")
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise bad(f"jobs[{i}]: 'name' must be a string")
    resources = _resources(raw.get("resources"), f"jobs[{i}].resources", bad)
    return Job(tuple(_local(a, root) for a in adapters), str(root / output), weights, name, resources)


def _resources(raw: Any, where: str, bad: Any) -> Resources | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - set(_RESOURCES):
        raise bad(f"'{where}' must be an object with {' and/or '.join(_RESOURCES)}")
    cpus = raw.get("num_cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0):
        raise bad(f"'{where}.num_cpus' must be a positive number")
    memory = raw.get("memory")
    if memory is not None:
        from .options import parse_size

        try:
            memory = parse_size(memory)
        except (ValueError, TypeError):
            raise bad(f"'{where}.memory' must be a size such as \"8GB\" or a number of bytes") from None
    return Resources(float(cpus) if cpus is not None else None, memory)


def _local(source: str, root: Path) -> str:
    """A relative path that exists next to the job file, made absolute; repo ids and other paths as given."""
    candidate = root / source
    return str(candidate) if not Path(source).is_absolute() and candidate.exists() else source


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InputError(f"{path}: YAML job files need PyYAML (pip install 'streammerge[yaml]'); or "
                                   "write the file as JSON or TOML") from None
            return yaml.safe_load(text)
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise InputError(f"{path}: TOML job files need Python 3.11 or newer; or write the file as JSON "
                                   "or YAML") from None
            return tomllib.loads(text)
        return json.loads(text)
    except InputError:
        raise
    except Exception as e:  # every parser has its own error types; each means the same: not a valid file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a valid {suffix.lstrip('.') or 'JSON'} job file ({first[:200]})") from None
