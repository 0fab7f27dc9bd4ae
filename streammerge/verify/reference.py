"""The merge's formulas evaluated in float64, written from the PEFT spec, for `verify` to check an output with.

Nothing here calls the merge's row engine (merge.py) or its kernels (kernels.py), so a wrong formula there cannot
vouch for itself; base and adapter tensors are read with the safetensors library, not streammerge's reader. What
is shared is the plan: which adapter tensors go to which output tensor, the scale `s`, the orientation (Conv1D and
embedding deltas transposed, fused experts `[E, in, out]`), the DoRA and IA3 axes and the trainable-token indices.

For a block of rows of an output tensor `TensorReference.block` returns the exact value of the formula (float64,
whole rows) and a bound on how far a float32 evaluation of the same formula can drift from it. The merge writes
`round(y)` for a float32 `y` within that bound, and rounding is monotonic, so a correct output lies elementwise
in `[round(x - e), round(x + e)]` (`output_bounds`): usually a single value for bf16/f16 outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter
from ..bounds import F64, U32, Pair, Workspace, make_pair
from ..io.formats import DTYPES
from ..io.safetensors import TensorInfo
from ..plan import OutTensor
from ..plan.combine import split_member_key
from ..tuners.base import Op
from .quantized import dequantized_rows

F16_MAX = 65504.0


class Sources:
    """Base and adapter tensors, read through the safetensors library (files stay memory-mapped)."""

    # the library maps each file whole and every page read stays resident in that mapping until it is closed:
    # reopen a file after this many bytes so the process does not grow by the model's size
    REOPEN_BYTES = 64 * 2**20

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._files: dict[Path, Any] = {}
        self._read: dict[Path, int] = {}
        self._factors: dict[str, Tensor] = {}

    def _open(self, path: Path, nbytes: int = 0):
        handle = self._files.get(path)
        if handle is not None and self._read[path] + nbytes > self.REOPEN_BYTES:
            self._close(path)
            handle = None
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            handle.__enter__()
            self._files[path], self._read[path] = handle, 0
        self._read[path] += nbytes
        return handle

    def _close(self, path: Path) -> None:
        handle = self._files.pop(path, None)
        self._read.pop(path, None)
        if handle is not None:
            handle.__exit__(None, None, None)

    def base_rows(self, info: TensorInfo, per_index: int, cols: int, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the base tensor viewed as `[-1, cols]`, where `per_index` rows make one index of
        dim 0 (1 for the usual `[dim0, rest]` view)."""
        handle = self._open(info.path, (r1 - r0) * cols * info.itemsize)
        return self._rows(handle, info.name, info.shape, per_index, cols, r0, r1)

    def slice(self, info: TensorInfo, i0: int, i1: int) -> Tensor:
        """Indices [i0, i1) of dim 0 of a base tensor as stored (a 0-d tensor: the value)."""
        handle = self._open(info.path, (i1 - i0) * info.row_nbytes if info.shape else info.nbytes)
        return handle.get_slice(info.name)[i0:i1] if info.shape else handle.get_tensor(info.name)

    def adapter_rows(self, key: str, shape: tuple[int, ...], per_index: int, cols: int, r0: int, r1: int) -> Tensor:
        path = self.adapter.weights_path
        if path.suffix == ".safetensors":
            handle = self._open(path, (r1 - r0) * cols * self.adapter.dtypes[key].itemsize)
            return self._rows(handle, key, shape, per_index, cols, r0, r1)
        whole = self.adapter.get(key)
        return whole.reshape(-1, cols)[r0:r1] if whole.numel() else whole.reshape(r1 - r0, cols)

    def factor(self, key: str) -> Tensor:
        """A whole adapter tensor as float64 (factors are small: rank x dim)."""
        t = self._factors.get(key)
        if t is None:
            path = self.adapter.weights_path
            if path.suffix == ".safetensors":
                nbytes = math.prod(self.adapter.shapes[key]) * self.adapter.dtypes[key].itemsize
                raw = self._open(path, nbytes).get_tensor(key)
            else:
                raw = self.adapter.get(key)
            t = raw.to(F64)
            self._factors[key] = t
        return t

    def tensor_done(self) -> None:
        """Drop the factors and the file mappings of the tensor just checked."""
        self._factors.clear()
        for path in list(self._files):
            self._close(path)

    @staticmethod
    def _rows(handle, name: str, shape: tuple[int, ...], per_index: int, cols: int, r0: int, r1: int) -> Tensor:
        if not shape:
            return handle.get_tensor(name).reshape(1, 1)[r0:r1]
        i0, i1 = r0 // per_index, -(-r1 // per_index)
        slab = handle.get_slice(name)[i0:i1]
        if slab.numel() == 0:  # a dimension of size 0: nothing to read, and reshape(-1, 0) is ambiguous
            return slab.reshape(r1 - r0, cols)
        return slab.reshape(-1, cols)[r0 - i0 * per_index: r1 - i0 * per_index]

    def close(self) -> None:
        self.tensor_done()


class CombinedSources(Sources):
    """The sources of a weighted combination: base tensors as usual, adapter tensors from the member a qualified
    key names (plan/combine.py's `member_key`), each member read through its own Sources."""

    def __init__(self, adapter: Adapter, members: list[Adapter]) -> None:
        super().__init__(adapter)
        self.members = [Sources(m) for m in members]

    def _member(self, qualified: str) -> tuple[Sources, str]:
        i, key = split_member_key(qualified)
        return self.members[i], key

    def adapter_rows(self, key: str, shape: tuple[int, ...], per_index: int, cols: int, r0: int, r1: int) -> Tensor:
        src, k = self._member(key)
        return src.adapter_rows(k, shape, per_index, cols, r0, r1)

    def factor(self, key: str) -> Tensor:
        src, k = self._member(key)
        return src.factor(k)

    def tensor_done(self) -> None:
        super().tensor_done()
        for m in self.members:
            m.tensor_done()


def row_view(t: OutTensor) -> tuple[int, int, int]:
    """(rows, cols, rows per index of dim 0) of the 2-D view the reference works on.

    Usually `[dim0, rest]` (a row = an output channel, as DoRA's norm needs); a fused expert tensor `[E, d1, d2]`
    is viewed as `[E*d1, d2]` so one row is one row of one expert's matrix, not a whole expert.
    """
    shape = t.shape
    if not shape:
        return 1, 1, 1
    if len(shape) == 3 and any(op.expert_rows for op in t.ops):
        return shape[0] * shape[1], shape[2], shape[1]
    return shape[0], math.prod(shape[1:]), 1


class TensorReference:
    """The float64 reference for one output tensor, row block by row block: each operation's `reference`
    formula (written in its tuner, apart from the engine's kernels) on factors read here."""

    def __init__(self, t: OutTensor, src: Sources, ws: Workspace | None = None) -> None:
        self.t = t
        self.src = src
        self.ws = ws or Workspace()
        self.rows, self.cols, self.per_index = row_view(t)
        self.out_dtype = DTYPES[t.dtype]
        # copies, casts, replacements and trainable-token rows involve no arithmetic: the output must be the
        # source value rounded once, bit for bit
        self.exact = not any(op.arithmetic for op in t.ops)
        if t.replacement is not None:
            src_dtype = src.adapter.dtypes[t.replacement]
        else:
            assert t.base is not None
            src_dtype = t.base.torch_dtype
        # the merge computes in a float32 copy of the source: a float64 source is rounded on the way in
        self._source_rounding = U32 if src_dtype == F64 and not self.exact else 0.0
        self._col_norms: dict[int, tuple[Tensor, Tensor]] = {}
        self._pairs: dict[object, Pair] = {}

    def factor(self, key: str) -> Tensor:
        return self.src.factor(key)

    def pair(self, key: object, make) -> Pair:
        """(left, right, row norms of left, column norms of right) of a product `left @ right` whose row i is row
        i of the delta, made once per tensor."""
        hit = self._pairs.get(key)
        if hit is None:
            hit = make_pair(*make())
            self._pairs[key] = hit
        return hit

    def column_norms(self, op: Op) -> tuple[Tensor, Tensor]:
        """Norms over every row of each column of the value before `op`, and of its error bound."""
        i = next(j for j, o in enumerate(self.t.ops) if o is op)
        if i not in self._col_norms:
            sq = torch.zeros(self.cols, dtype=F64)
            sq_e = torch.zeros(self.cols, dtype=F64)
            step = max(1, (1 << 17) // max(1, self.cols))
            for r0 in range(0, self.rows, step):
                x, e = self._apply(i, r0, min(self.rows, r0 + step))
                sq += (x * x).sum(dim=0)
                sq_e += (e * e).sum(dim=0)
            self._col_norms[i] = sq.sqrt().reshape(1, -1), sq_e.sqrt().reshape(1, -1)
        return self._col_norms[i]

    def source(self, r0: int, r1: int) -> Tensor:
        """Rows of the tensor the merge starts from (the base, or the adapter's replacement), as stored."""
        t = self.t
        if t.replacement is not None:
            key = t.replacement
            return self.src.adapter_rows(key, self.src.adapter.shapes[key], self.per_index, self.cols, r0, r1)
        assert t.base is not None
        if t.quant is not None:  # a quantized base: its values as transformers dequantizes them
            return dequantized_rows(t.quant.tensor, self.src, self.per_index, self.cols, r0, r1)
        return self.src.base_rows(t.base, self.per_index, self.cols, r0, r1)

    def block_exact(self, r0: int, r1: int) -> Tensor:
        """For an `exact` tensor: rows [r0, r1) as the output must hold them."""
        x = self.source(r0, r1)
        if self.t.ops:
            x = x.to(F64, copy=True)
            for op in self.t.ops:
                x, _ = op.reference(self, x, None, r0, r1)
        return _round(x, self.out_dtype)

    def block(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """(exact value, float32 error bound) of rows [r0, r1), float64 `[r1 - r0, cols]` each (views into the
        workspace, valid until the next call)."""
        for op in self.t.ops:
            if op.prepass:
                self.column_norms(op)
        return self._apply(len(self.t.ops), r0, r1)

    def _apply(self, n_ops: int, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        shape = (r1 - r0, self.cols)
        x = self.ws.get("x", shape)
        x.copy_(self.source(r0, r1))
        e = self.ws.get("e", shape)
        if self._source_rounding:
            torch.abs(x, out=e).mul_(self._source_rounding)
        else:
            e.zero_()
        for op in self.t.ops[:n_ops]:
            x, e_out = op.reference(self, x, e, r0, r1)
            assert e_out is not None
            e = e_out
        return x, e


def _round(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round to the output dtype as the merge does (float16 values beyond its range are clamped: an unclamped
    overflow is refused, never written)."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        if x.dtype == torch.bfloat16:
            x = x.float()  # as the merge does: bf16 cannot hold 65504, so clamping in bf16 would give inf
        x = x.clamp(-F16_MAX, F16_MAX)
    return x.to(dtype)


def round_once(x: Tensor, dtype: torch.dtype, ws: Workspace) -> Tensor:
    """x rounded to float32 and then to the output dtype (into workspace buffers)."""
    narrow = ws.get("narrow", x.shape, torch.float32)
    narrow.copy_(x)
    if dtype == torch.float16:
        narrow.clamp_(-F16_MAX, F16_MAX)
    return narrow if dtype == torch.float32 else ws.get("rounded", x.shape, dtype).copy_(narrow)


def output_bounds(x: Tensor, e: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(round(x), round(x - e), round(x + e)) in `dtype`: a float32 y with |y - x| <= e is rounded to a value
    between the last two (rounding to float32 and then to the output dtype is monotonic, and y is a float32)."""
    def rnd(v: Tensor) -> Tensor:
        v = v.to(torch.float32)
        return (v.clamp(-F16_MAX, F16_MAX) if dtype == torch.float16 else v).to(dtype)

    return rnd(x), rnd(x - e), rnd(x + e)
