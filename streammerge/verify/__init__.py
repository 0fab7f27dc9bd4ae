"""`streammerge verify`: check a merged output against base + adapter, independently of the merge's engine.

Every output tensor is checked on sampled row blocks (the first and last block of each tensor and a few random
ones; every row on request) against `reference.py`: the variant's formula evaluated in float64 from the base and
adapter files, read with the safetensors library. Tensors with no arithmetic (copies, casts, full replacements,
trainable-token rows) must match the source value rounded once, bit for bit; merged values must lie within what
float32 arithmetic can explain of the float64 value, rounded once to the output dtype (see `output_bounds`).
The plan -- which adapter tensors go to which output tensor, the scale, the orientation -- is shared with the
merge, not re-derived. Missing, extra and mis-shaped tensors, config.json, each shard's `__metadata__` and the
copied side files (tokenizer, chat template, generation config...) are checked too, and the output is read
through the same strict header reader as a base, so a damaged header is caught as well.
"""

from __future__ import annotations

import filecmp
import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..bounds import Workspace
from ..engine import (
    one_torch_thread,  # the thread policy only; no merge math is imported
)
from ..errors import CheckpointError, MissingFileError, VerifyError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.formats import DTYPE_NAMES
from ..io.hub import resolve
from ..io.reader import TensorReader
from ..io.safetensors import read_header
from ..io.sidefiles import output_config, read_base_config, side_files
from ..options import OUT_DTYPES, output_dtype, parse_size
from ..plan import OutTensor
from ..plan.combine import AdapterSet, combined_side_files, is_combination, plan_adapters
from .quantized import check_requantized
from .reference import CombinedSources, Sources, TensorReference, output_bounds, round_once

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# row blocks per tensor checked by default, besides the first and the last
DEFAULT_SAMPLE_BLOCKS = 8
# float64 working set of one row block: a few arrays of this many bytes each
DEFAULT_BLOCK_BYTES = 1 << 20


@dataclass
class TensorCheck:
    name: str
    max_ulps: int                  # beyond what is allowed (0: the tensor passed)
    rows_checked: int
    rows: int
    exact: bool = True             # no arithmetic: compared bit for bit with the source rounded once
    off_rounded: int = 0           # values that are not the float64 reference rounded once (all within tolerance)
    detail: str = ""               # where the largest excess is, with the values


@dataclass
class VerifyReport:
    """The outcome: per-tensor ulps, missing/extra tensors, config differences."""

    checks: list[TensorCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # shape or dtype differs
    config_problems: list[str] = field(default_factory=list)
    dtype_choices: list[str] = field(default_factory=list)  # the --dtype values the output is consistent with

    @property
    def worst(self) -> TensorCheck | None:
        return max(self.checks, key=lambda c: c.max_ulps, default=None)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.mismatched or self.config_problems) and all(
            c.max_ulps == 0 for c in self.checks
        )

    def problems(self) -> list[str]:
        out = [f"missing tensor {n}" for n in self.missing] + [f"unexpected tensor {n}" for n in self.extra]
        out += self.mismatched + self.config_problems
        for c in self.checks:
            if c.max_ulps and c.exact:
                out.append(f"{c.name}: differs by up to {c.max_ulps} ulp from its source rounded once (it is "
                           f"copied or replaced, so it must match bit for bit; {c.detail})")
            elif c.max_ulps:
                out.append(f"{c.name}: differs by up to {c.max_ulps} ulp beyond float32 rounding from the float64 "
                           f"reference ({c.detail})")
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
    adapter: str | Path | Sequence[str | Path],
    merged: str | Path,
    *,
    weights: Sequence[float] | None = None,
    loader: str = "auto",
    sample_blocks: int | None = DEFAULT_SAMPLE_BLOCKS,
    dtype: str | None = None,
    hf_token: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
) -> VerifyReport:
    """Check the merged checkpoint at `merged` against `base + adapter` (see the module docstring).

    `sample_blocks` row blocks per tensor are checked besides the first and the last; None checks every row.
    `dtype` is the --dtype the merge was run with; None accepts any choice the output's tensors are consistent
    with (config.json must then be what the merge writes for one of them). `max_memory` bounds the working memory.
    Several adapters (or one with `weights`) check a weighted combination, as `merge` takes them.
    """
    say = log or (lambda _m: None)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}")
    block_bytes = DEFAULT_BLOCK_BYTES if max_memory is None else max(1 << 14, min(DEFAULT_BLOCK_BYTES,
                                                                                  parse_size(max_memory) // 16))
    base_dir = resolve(base, "base", hf_token)
    adapter_dirs = [resolve(a, "adapter", hf_token) for a in ([adapter] if isinstance(adapter, (str, Path))
                                                              else adapter)]
    combination = is_combination(len(adapter_dirs), weights)
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
    # dtypes: each tensor's source dtype (a quantized base's kept quantization, when the output kept it)
    keep = _kept_quantization(base_dir, merged_dir, dtype)
    plan, lora = plan_adapters(ckpt, adapter_dirs, weights, dtype="keep" if keep else "auto", loader=loader)
    sources = CombinedSources(lora, list(lora.members)) if isinstance(lora, AdapterSet) else Sources(lora)
    ws = Workspace()
    report = VerifyReport()
    rng = random.Random(seed)
    try:
        files = combined_side_files(base_dir, adapter_dirs) if combination else side_files(base_dir, adapter_dirs[0])
        expected = {t.name: t for t in plan.tensors}
        report.missing = [n for n in expected if n not in out.tensors]
        report.extra = [n for n in out.tensors if n not in expected]
        report.dtype_choices = _dtype_choices(plan.tensors, out.tensors, "keep" if keep else dtype)
        choice = report.dtype_choices[0]
        with TensorReader() as merged_reader, one_torch_thread():
            for name, t in expected.items():
                got = out.tensors.get(name)
                if got is None:
                    continue
                t.dtype = output_dtype(choice, t.dtype)
                if got.shape != t.shape or got.dtype != t.dtype:
                    report.mismatched.append(f"{name}: merged is {got.dtype}{list(got.shape)}, expected "
                                             f"{t.dtype}{list(t.shape)}")
                    continue
                if t.quant is not None and t.quant.scale_of is not None:
                    continue  # a re-quantized weight's new scale: checked with its weight
                if t.quant is not None and t.quant.requant is not None:
                    check = _check_requantized(t, out, merged_reader, sources, ws, sample_blocks, rng, block_bytes)
                else:
                    # checked rows' pages are released as it goes, so the process does not grow by the model's size
                    check = _check_tensor(t, merged_reader.tensor(got), sources, ws, sample_blocks, rng, block_bytes,
                                          release=functools.partial(merged_reader.release, got))
                sources.tensor_done()
                report.checks.append(check)
                if check.max_ulps:
                    say(f"  {name}: up to {check.max_ulps} ulp off ({check.detail})")
        report.config_problems = _check_config(base_dir, merged_dir, plan.config_updates, report.dtype_choices)
        missing_files = [f for f in files if not (merged_dir / f).exists()]
        report.config_problems += [f"file {f} was not copied" for f in missing_files]
        report.config_problems += _check_metadata(out)
        report.config_problems += _check_side_files(files, merged_dir)
    finally:
        sources.close()
        lora.close()
    return report


def _kept_quantization(base_dir: Path, merged_dir: Path, pinned: str | None) -> bool:
    """Whether the output is a --dtype keep merge of a quantized base: pinned so, or (unpinned) the base and the
    output both have a quantization_config (every other --dtype removes it)."""
    if pinned is not None:
        return pinned == "keep"
    try:
        merged = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(merged, dict) and "quantization_config" in merged
            and "quantization_config" in read_base_config(base_dir))


def _dtype_choices(planned: list[OutTensor], merged: dict, pinned: str | None) -> list[str]:
    """The --dtype values that give every merged tensor its dtype (`planned` holds each tensor's source dtype);
    the closest one when none does, so the mismatches are reported against it."""
    options = [pinned] if pinned is not None else [c for c in OUT_DTYPES if c != "keep"]

    def mismatches(choice: str) -> int:
        return sum(1 for t in planned if t.name in merged and merged[t.name].dtype != output_dtype(choice, t.dtype))

    fits = [c for c in options if mismatches(c) == 0]
    return fits or [min(options, key=mismatches)]


def _check_tensor(t: OutTensor, merged: torch.Tensor, sources: Sources, ws: Workspace, sample_blocks: int | None,
                  rng: random.Random, block_bytes: int,
                  release: Callable[[int, int], None] = lambda a, b: None) -> TensorCheck:
    """Compare the merged tensor (a view of the output) with the reference, block by block; `release(a, b)` is
    told when indices [a, b) of dim 0 are done with."""
    ref = TensorReference(t, sources, ws)
    rows, cols = ref.rows, ref.cols
    have_all = merged.reshape(rows, cols)
    step = max(1, block_bytes // (8 * max(1, cols)))
    chosen = _sampler(rows, step, sample_blocks, rng)
    check = TensorCheck(t.name, 0, 0, rows, exact=ref.exact)
    released = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if not chosen(r0, r1):
            continue
        have = have_all[r0:r1]
        if ref.exact:
            want = ref.block_exact(r0, r1)
            excess = ulp_distance(want, have)
            if excess > check.max_ulps:
                check.max_ulps, check.detail = excess, _where_exact(have, want, r0)
        else:
            x, e = ref.block(r0, r1)
            # most values are the float64 value rounded once (compared as bits: cheaper, and -0.0 vs +0.0 or a NaN
            # only go on to the interval test); only the others need their interval
            ints = _INT_VIEW[have.element_size()]
            rounded = round_once(x, have.dtype, ws)
            off = torch.ne(have.view(ints), rounded.view(ints), out=ws.get("flags", have.shape, torch.bool))
            n_off = int(torch.count_nonzero(off))
            if n_off:
                check.off_rounded += n_off
                at = off.reshape(-1).nonzero().squeeze(1)
                h, xs = have.reshape(-1)[at], x.reshape(-1)[at]
                _, lo, hi = output_bounds(xs, e.reshape(-1)[at], have.dtype)
                distance = _line_distance(h, lo, hi)
                worst = int(distance.argmax())
                if int(distance[worst]) > check.max_ulps:
                    i, j = divmod(int(at[worst]), cols)
                    check.max_ulps = int(distance[worst])
                    check.detail = (f"row {r0 + i}, column {j}: merged {h[worst].item()!r}, float64 reference "
                                    f"{xs[worst].item():.9g}, allowed {lo[worst].item()!r} to {hi[worst].item()!r}")
        check.rows_checked += r1 - r0
        # from the previous block on: the kernel maps pages around each fault, also behind the rows just read
        release(released, -(-r1 // ref.per_index))
        released = r0 // ref.per_index
    release(0, -(-rows // ref.per_index))
    return check


def _check_requantized(t: OutTensor, out: Checkpoint, reader: TensorReader, sources: Sources, ws: Workspace,
                       sample_blocks: int | None, rng: random.Random, block_bytes: int) -> TensorCheck:
    """A re-quantized weight and its new scale against the float64 merge (see verify/quantized.py)."""
    assert t.quant is not None and t.quant.requant is not None
    codes = reader.tensor(out.tensors[t.name])
    scale = reader.tensor(out.tensors[t.quant.requant.scale.name])
    rows, cols = codes.shape
    step = max(1, block_bytes // (8 * max(1, cols)))
    excess, checked, detail = check_requantized(t, codes, scale, TensorReference(t, sources, ws),
                                                _sampler(rows, step, sample_blocks, rng), step)
    reader.release(out.tensors[t.name])
    return TensorCheck(t.name, excess, checked, rows, exact=False, detail=detail)


def _sampler(rows: int, step: int, sample_blocks: int | None, rng: random.Random) -> Callable[[int, int], bool]:
    """Which row blocks to check: all, or the first, the last and each other with probability N / blocks."""
    if sample_blocks is None:
        return lambda r0, r1: True
    blocks = max(1, -(-rows // step))

    def chosen(r0: int, r1: int) -> bool:
        return r0 == 0 or r1 == rows or rng.random() < sample_blocks / blocks

    return chosen


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits -> int64 on a line where neighbouring values differ by one (and -0.0 == +0.0)."""
    size = t.element_size()
    i = t.contiguous().view(_INT_VIEW[size]).to(torch.int64)
    if not t.is_floating_point():
        return i
    mask = (1 << (8 * size - 1)) - 1
    return torch.where(i < 0, -(i & mask), i)


def _line_distance(have: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per element, how many ulps `have` lies outside [lo, hi] (0 inside); NaN is far from everything."""
    h, a, b = _ordered(have), _ordered(lo), _ordered(hi)
    d = torch.maximum(a - h, h - b).clamp_min(0)
    if have.is_floating_point():
        d = torch.where(torch.isnan(have) | torch.isnan(lo) | torch.isnan(hi), torch.full_like(d, 1 << 40), d)
    return d.reshape(-1) if d.numel() else torch.zeros(1, dtype=torch.int64)


def _where_exact(have: torch.Tensor, want: torch.Tensor, r0: int) -> str:
    """Row, column and values of the first element whose bits differ."""
    ints = _INT_VIEW[have.element_size()]
    bad = have.contiguous().view(ints).reshape(-1) != want.contiguous().view(ints).reshape(-1)
    flat = int(bad.nonzero()[0][0]) if bool(bad.any()) else 0
    i, j = divmod(flat, have.shape[1] if have.dim() > 1 else 1)
    got, exp = have.reshape(-1)[flat].item(), want.reshape(-1)[flat].item()
    return f"row {r0 + i}, column {j}: merged {got!r}, expected {exp!r}"


def _check_metadata(out: Checkpoint) -> list[str]:
    """Every merged shard carries the `__metadata__` the merge writes (transformers checks `format`)."""
    from ..io.sharding import DEFAULT_METADATA

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


def _dtype_name(choice: str) -> str | None:
    out = OUT_DTYPES[choice]
    return DTYPE_NAMES[out] if out is not None else None


def _check_config(base_dir: Path, merged_dir: Path, updates: dict, choices: list[str]) -> list[str]:
    """config.json must be exactly what the merge writes for one of the --dtype `choices`."""
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
    base_config = read_base_config(base_dir)
    # what merge._write_output_config writes: the dtype named for bf16/f16/f32, the base's left as it is for auto
    wants = [output_config(base_config, _dtype_name(c), updates) for c in choices]
    differences = [_config_differences(want, have) for want in wants]
    return [] if any(not d for d in differences) else min(differences, key=len)


def _config_differences(want: dict, have: dict) -> list[str]:
    return [f"config.json field {key!r}: merged has {have.get(key)!r}, expected {want.get(key)!r}"
            for key in sorted(set(want) | set(have)) if want.get(key) != have.get(key)]
