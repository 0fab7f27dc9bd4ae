"""`streammerge verify`: recompute the merge from base + adapter and compare it with a merged output.

Every tensor is compared bit by bit in units in the last place of its dtype (all rows by default, or a sample
of row blocks per tensor for speed); missing and extra tensors, the config, each shard's `__metadata__` and the
copied side files (tokenizer, chat template, generation config...) are checked too. It reads the merged output
through the same strict header reader, so a damaged header is caught as well as a flipped byte.
"""

from __future__ import annotations

import filecmp
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import load_adapter
from .checkpoint import Checkpoint, TensorReader, open_checkpoint, read_header
from .errors import CheckpointError, MissingFileError, VerifyError
from .files import DTYPE_NAMES, output_config, side_files
from .hub import resolve
from .merge import DEFAULT_BLOCK_BYTES, _block_bytes, merged_rows, one_torch_thread
from .plan import FLOAT_DTYPES, build_plan, read_base_config

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class TensorCheck:
    name: str
    max_ulps: int
    rows_checked: int
    rows: int


@dataclass
class VerifyReport:
    """The outcome: per-tensor ulps, missing/extra tensors, config differences."""

    checks: list[TensorCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # shape or dtype differs
    config_problems: list[str] = field(default_factory=list)

    @property
    def worst(self) -> TensorCheck | None:
        return max(self.checks, key=lambda c: c.max_ulps, default=None)

    @property
    def ok(self) -> bool:
        w = self.worst
        return not (self.missing or self.extra or self.mismatched or self.config_problems) and (
            w is None or w.max_ulps == 0
        )

    def problems(self) -> list[str]:
        out = [f"missing tensor {n}" for n in self.missing] + [f"unexpected tensor {n}" for n in self.extra]
        out += self.mismatched + self.config_problems
        out += [f"{c.name}: differs by up to {c.max_ulps} ulp" for c in self.checks if c.max_ulps]
        return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two tensors of the same dtype (exact).

    Bit-identical tensors are 0 apart; any other bit difference counts at least 1 (so -0.0 vs +0.0, or two
    different NaN payloads, are still reported: the merge is deterministic, so the bytes must match).
    """
    if a.numel() == 0:
        return 0
    size = a.element_size()
    ia = a.contiguous().view(_INT_VIEW[size])
    ib = b.contiguous().view(_INT_VIEW[size])
    if torch.equal(ia, ib):  # the common case, and much cheaper than the ulp arithmetic below
        return 0
    if not a.is_floating_point():
        return 1
    diff = ia != ib
    ia, ib = ia[diff].to(torch.int64), ib[diff].to(torch.int64)
    mask = (1 << (8 * size - 1)) - 1
    # sign-magnitude bits -> a monotonic integer line, so neighbours differ by exactly one
    ia = torch.where(ia < 0, -(ia & mask), ia)
    ib = torch.where(ib < 0, -(ib & mask), ib)
    return max(1, int((ia - ib).abs().max()))


def verify(
    base: str | Path,
    adapter: str | Path,
    merged: str | Path,
    *,
    loader: str = "auto",
    sample_blocks: int | None = None,
    hf_token: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
) -> VerifyReport:
    """Recompute `base + adapter` and compare with the merged checkpoint at `merged`.

    With `sample_blocks`, only that many row blocks per tensor (plus the first and last) are recomputed;
    otherwise every row is. `max_memory` bounds the row-block size (the merged bytes do not depend on it).
    """
    say = log or (lambda _m: None)
    block_bytes = DEFAULT_BLOCK_BYTES if max_memory is None else _block_bytes(max_memory)
    base_dir = resolve(base, "base", hf_token)
    adapter_dir = resolve(adapter, "adapter", hf_token)
    merged_dir = Path(merged).expanduser()
    ckpt = open_checkpoint(base_dir)
    if not merged_dir.is_dir():
        raise MissingFileError(f"{merged_dir}: --merged folder not found; pass the folder the merge wrote")
    try:
        out = open_checkpoint(merged_dir)
    except CheckpointError as e:
        # base and adapter read fine, so a broken header or index here is damage to the merged output
        raise VerifyError(f"merged output is damaged: {e}") from None
    except MissingFileError as e:
        raise VerifyError(f"merged output is incomplete: {e}") from None
    lora = load_adapter(adapter_dir)
    report = VerifyReport()
    rng = random.Random(seed)
    try:
        plan = build_plan(ckpt, lora, dtype="auto", loader=loader)
        expected = {t.name: t for t in plan.tensors}
        report.missing = [n for n in expected if n not in out.tensors]
        report.extra = [n for n in out.tensors if n not in expected]
        out_dtypes = set()
        with TensorReader() as reader, TensorReader() as merged_reader, one_torch_thread():
            for name, t in expected.items():
                got = out.tensors.get(name)
                if got is None:
                    continue
                if got.dtype != t.dtype and got.dtype in FLOAT_DTYPES and t.dtype in FLOAT_DTYPES:
                    t.dtype = got.dtype  # the output dtype the merge was run with
                out_dtypes.add(got.dtype)
                if got.shape != t.shape or got.dtype != t.dtype:
                    report.mismatched.append(f"{name}: merged is {got.dtype}{list(got.shape)}, expected "
                                             f"{t.dtype}{list(t.shape)}")
                    continue
                rows = t.shape[0] if t.shape else 1
                chosen = _sampler(rows, sample_blocks, rng)
                worst, checked = 0, 0
                blocks = merged_rows(t, reader, lora, block_bytes, clamp_f16=True, blocks=chosen)
                for r0, r1, y, _buf in blocks:
                    have = merged_reader.rows(got, r0, r1).reshape(y.shape)
                    worst = max(worst, ulp_distance(y, have))
                    checked += r1 - r0
                report.checks.append(TensorCheck(name, worst, checked, rows))
                if worst:
                    say(f"  {name}: up to {worst} ulp")
        report.config_problems = _check_config(base_dir, merged_dir, plan.config_updates, out_dtypes)
        missing_files = [f for f in side_files(base_dir, adapter_dir) if not (merged_dir / f).exists()]
        report.config_problems += [f"file {f} was not copied" for f in missing_files]
        report.config_problems += _check_metadata(out)
        report.config_problems += _check_side_files(side_files(base_dir, adapter_dir), merged_dir)
    finally:
        lora.close()
    return report


def _sampler(rows: int, sample_blocks: int | None, rng: random.Random) -> Callable[[int, int], bool] | None:
    if sample_blocks is None:
        return None

    def chosen(r0: int, r1: int) -> bool:
        blocks = max(1, math.ceil(rows / max(1, r1 - r0)))
        return r0 == 0 or r1 == rows or rng.random() < sample_blocks / blocks

    return chosen


def _check_metadata(out: Checkpoint) -> list[str]:
    """Every merged shard carries the `__metadata__` the merge writes (transformers checks `format`)."""
    from .writer import DEFAULT_METADATA

    problems = []
    for path in out.files:
        _, metadata = read_header(path)
        if metadata != dict(DEFAULT_METADATA):
            problems.append(f"{path.name}: __metadata__ is {metadata}, the merge writes {dict(DEFAULT_METADATA)}")
    return problems


def _check_side_files(files: dict[str, Path], merged_dir: Path) -> list[str]:
    """The copied files (tokenizer, templates, generation config...) are byte for byte their sources."""
    problems = []
    for rel, src in files.items():
        dst = merged_dir / rel
        if rel != "config.json" and dst.is_file() and not filecmp.cmp(src, dst, shallow=False):
            problems.append(f"file {rel} differs from {src}")
    return problems


def _check_config(base_dir: Path, merged_dir: Path, updates: dict, out_dtypes: set[str]) -> list[str]:
    src = base_dir / "config.json"
    dst = merged_dir / "config.json"
    if not src.exists():
        return []
    if not dst.exists():
        return ["config.json is missing from the merged output"]
    try:
        have = json.loads(dst.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"merged config.json is not valid JSON ({e})"]
    floats = out_dtypes & FLOAT_DTYPES
    # one float dtype throughout: the merge named it in the config; several: an auto merge kept the base's
    dtype_name = DTYPE_NAMES[next(iter(floats))] if len(floats) == 1 else None
    want = output_config(read_base_config(base_dir), dtype_name, updates)
    problems = []
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            problems.append(f"config.json field {key!r}: merged has {have.get(key)!r}, expected {want.get(key)!r}")
    return problems
