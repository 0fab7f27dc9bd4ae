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

import torch
from torch import Tensor

from .adapter import Adapter
from .checkpoint import DTYPES, TensorInfo
from .plan import (
    VERA_SHARED, BiasAdd, DoraCols, DoraRows, Ia3Scale, LohaRows, LokrRows, LoraCols, LoraExperts, LoraRows,
    OutTensor, TokenRows, VeraRows,
)

F64 = torch.float64
U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
# A float32 dot product of length n is within n*u/(1 - n*u) * sum|x_i*y_i| of the exact one (any summation order);
# each further operation (scale, add, the scale's own rounding to float32) adds one u. SLACK doubles the total to
# cover the second-order terms the per-step bounds leave out.
SLACK = 2.0
F16_MAX = 65504.0


def _gamma(n: int) -> float:
    """Bound on the relative error of n float32 roundings in a row (with SLACK)."""
    nu = n * U32
    return SLACK * nu / (1.0 - nu)


class Workspace:
    """Scratch buffers reused by every row block: fresh allocations of this size would page-fault every time."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = F64) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


class Sources:
    """Base and adapter tensors, read through the safetensors library (files stay memory-mapped)."""

    # the library maps each file whole and every page read stays resident in that mapping until it is closed:
    # reopen a file after this many bytes so the process does not grow by the model's size
    REOPEN_BYTES = 64 * 2**20

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._files: dict[Path, object] = {}
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


def row_view(t: OutTensor) -> tuple[int, int, int]:
    """(rows, cols, rows per index of dim 0) of the 2-D view the reference works on.

    Usually `[dim0, rest]` (a row = an output channel, as DoRA's norm needs); a fused expert tensor `[E, d1, d2]`
    is viewed as `[E*d1, d2]` so one row is one row of one expert's matrix, not a whole expert.
    """
    shape = t.shape
    if not shape:
        return 1, 1, 1
    if len(shape) == 3 and any(isinstance(op, LoraExperts) for op in t.ops):
        return shape[0] * shape[1], shape[2], shape[1]
    return shape[0], math.prod(shape[1:]), 1


ARITHMETIC = (LoraRows, LoraCols, LoraExperts, BiasAdd, DoraRows, DoraCols, LohaRows, LokrRows, Ia3Scale, VeraRows)


class TensorReference:
    """The float64 reference for one output tensor, row block by row block."""

    def __init__(self, t: OutTensor, src: Sources, ws: Workspace | None = None) -> None:
        self.t = t
        self.src = src
        self.ws = ws or Workspace()
        self.rows, self.cols, self.per_index = row_view(t)
        self.out_dtype = DTYPES[t.dtype]
        # copies, casts, replacements and trainable-token rows involve no arithmetic: the output must be the
        # source value rounded once, bit for bit
        self.exact = not any(isinstance(op, ARITHMETIC) for op in t.ops)
        src_dtype = (src.adapter.dtypes[t.replacement] if t.replacement is not None else t.base.torch_dtype)
        # the merge computes in a float32 copy of the source: a float64 source is rounded on the way in
        self._source_rounding = U32 if src_dtype == F64 and not self.exact else 0.0
        self._col_norms: dict[int, tuple[Tensor, Tensor]] = {}
        self._pairs: dict[object, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def source(self, r0: int, r1: int) -> Tensor:
        """Rows of the tensor the merge starts from (the base, or the adapter's replacement), as stored."""
        t = self.t
        if t.replacement is not None:
            key = t.replacement
            return self.src.adapter_rows(key, self.src.adapter.shapes[key], self.per_index, self.cols, r0, r1)
        return self.src.base_rows(t.base, self.per_index, self.cols, r0, r1)

    def block_exact(self, r0: int, r1: int) -> Tensor:
        """For an `exact` tensor: rows [r0, r1) as the output must hold them."""
        x = self.source(r0, r1)
        if any(isinstance(op, TokenRows) for op in self.t.ops):
            x = x.to(F64, copy=True)
            for op in self.t.ops:
                self._tokens(op, x, None, r0, r1)
        return _round(x, self.out_dtype)

    def block(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """(exact value, float32 error bound) of rows [r0, r1), float64 `[r1 - r0, cols]` each (views into the
        workspace, valid until the next call)."""
        for i, op in enumerate(self.t.ops):
            if isinstance(op, DoraCols) and i not in self._col_norms:
                self._col_norms[i] = self._column_norms(i)
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
        for i, op in enumerate(self.t.ops[:n_ops]):
            if isinstance(op, DoraCols):
                x, e = self._dora_cols(i, op, x, e)
            else:
                x, e = self._step(op, x, e, r0, r1)
        return x, e

    def _column_norms(self, i: int) -> tuple[Tensor, Tensor]:
        """Norms over every row of each column of the value before operation `i` and of its error bound."""
        sq = torch.zeros(self.cols, dtype=F64)
        sq_e = torch.zeros(self.cols, dtype=F64)
        step = max(1, (1 << 17) // max(1, self.cols))
        for r0 in range(0, self.rows, step):
            x, e = self._apply(i, r0, min(self.rows, r0 + step))
            sq += (x * x).sum(dim=0)
            sq_e += (e * e).sum(dim=0)
        return sq.sqrt().reshape(1, -1), sq_e.sqrt().reshape(1, -1)

    # -- one formula per operation (spec section in brackets) --------------------------------------------------

    def _step(self, op, x: Tensor, e: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        f = self.src.factor
        if isinstance(op, LoraRows):  # [4], [7] ConvNd flattened, [12] one expert of fused factors
            a, b = f(op.a), f(op.b)
            if op.expert is not None:
                r = a.shape[0] // op.experts
                a = a[op.expert * r:(op.expert + 1) * r]   # A_e: rows grouped by expert
                b = b[:, op.expert::op.experts]            # B_e: columns interleaved by expert
            if op.b_rows is not None:
                b = b[op.b_rows[0]:op.b_rows[1]]
            pair = self._pair(op, lambda: (b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)))
            if op.out_rows is None:
                return _add_product(x, e, pair, r0, r1, op.scale, self.ws)
            # a module cut out of a fused tensor: its delta covers rows [o0, o1) of W only
            o0, o1 = op.out_rows
            s0, s1 = max(r0, o0), min(r1, o1)
            if s0 < s1:
                _add_product(x[s0 - r0:s1 - r0], e[s0 - r0:s1 - r0], pair, s0 - o0, s1 - o0, op.scale, self.ws)
            return x, e
        if isinstance(op, LoraCols):  # [5] Conv1D, [6] embedding: dW = (B @ A)^T * s
            pair = self._pair(op, lambda: (f(op.a).T, f(op.b).T))
            return _add_product(x, e, pair, r0, r1, op.scale, self.ws)
        if isinstance(op, LoraExperts):  # [12] fused on disk: dW[e] = s * B_e @ A_e, or its transpose
            return self._experts(op, x, e, r0, r1)
        if isinstance(op, BiasAdd):  # [9] lora_bias: b + s * lora_B.bias
            v = f(op.key).reshape(-1, 1)[r0:r1]
            e = e + _gamma(3) * (x.abs() + abs(op.scale) * v.abs())
            return x + op.scale * v, e
        if isinstance(op, TokenRows):  # [10.2]
            self._tokens(op, x, e, r0, r1)
            return x, e
        if isinstance(op, DoraRows):  # [8] norm per row of W + dW
            m = f(op.key).reshape(-1)[r0:r1].reshape(-1, 1)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            e_norm = torch.linalg.vector_norm(e, dim=1, keepdim=True)
            return _dora(x, e, m, norm, e_norm, self.cols)
        if isinstance(op, LohaRows):  # [13] (w1a @ w1b) * (w2a @ w2b) * s
            w1a, w1b, w2a, w2b = f(op.w1a)[r0:r1], f(op.w1b), f(op.w2a)[r0:r1], f(op.w2b)
            d = (w1a @ w1b) * (w2a @ w2b)
            mag = (w1a.abs() @ w1b.abs()) * (w2a.abs() @ w2b.abs())
            e = e + _gamma(2 * w1b.shape[0] + 4) * (x.abs() + abs(op.scale) * mag)
            return x + op.scale * d, e
        if isinstance(op, LokrRows):  # [13] kron(w1, w2) * s
            (w1, s1, n1), (w2, s2, n2) = self._lokr_factor(op.w1), self._lokr_factor(op.w2)
            m2 = w2.shape[0]
            i = torch.arange(r0, r1)
            d = (w1[i // m2].unsqueeze(2) * w2[i % m2].unsqueeze(1)).reshape(r1 - r0, -1)
            mag = (s1[i // m2].unsqueeze(2) * s2[i % m2].unsqueeze(1)).reshape(r1 - r0, -1)
            e = e + _gamma(n1 + n2 + 4) * (x.abs() + abs(op.scale) * mag)
            return x + op.scale * d, e
        if isinstance(op, Ia3Scale):  # [13] W * l, per row (and the bias) or per column
            v = f(op.key).reshape(-1)
            v = v[r0:r1].reshape(-1, 1) if op.axis == "rows" else v.reshape(1, -1)
            y = x * v
            return y, e * v.abs() + _gamma(1) * y.abs()
        if isinstance(op, VeraRows):  # [13] (lambda_b * B[:out]) @ (lambda_d * A[:, :in])
            def factors() -> tuple[Tensor, Tensor]:
                a, b = f(VERA_SHARED[0]), f(VERA_SHARED[1])
                lb, ld = f(op.lambda_b).reshape(-1, 1), f(op.lambda_d).reshape(-1, 1)
                b_scaled, a_scaled = lb * b[: lb.shape[0]], ld * a
                if op.transpose:  # Conv1D [in, out]: rows are inputs
                    return a_scaled[:, : self.rows].T, b_scaled.T
                return b_scaled, a_scaled[:, : self.cols]

            return _add_product(x, e, self._pair(op, factors), r0, r1, 1.0, self.ws, extra=2)
        raise TypeError(f"no reference formula for {type(op).__name__}")

    def _experts(self, op: LoraExperts, x: Tensor, e: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        a, b = self.src.factor(op.a), self.src.factor(op.b)
        r = a.shape[0] // op.experts
        d1 = self.per_index
        row = r0
        while row < r1:  # the rows of one expert at a time
            ex = row // d1
            stop = min(r1, (ex + 1) * d1)
            i0, i1 = row - ex * d1, stop - ex * d1
            a_e, b_e = a[ex * r:(ex + 1) * r], b[:, ex::op.experts]
            xs, es = x[row - r0:stop - r0], e[row - r0:stop - r0]
            if op.transpose:  # stored [in, out]: row i of (B_e @ A_e)^T
                pair = self._pair((op, ex), lambda: (a_e.T, b_e.T))
            else:
                pair = self._pair((op, ex), lambda: (b_e, a_e))
            _add_product(xs, es, pair, i0, i1, op.scale, self.ws)
            row = stop
        return x, e

    def _pair(self, key, make) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(left, right, row norms of left, column norms of right) of a product `left @ right` whose row i is row
        i of the delta, made once per tensor."""
        hit = self._pairs.get(key)
        if hit is None:
            left, right = (m.contiguous() for m in make())
            hit = (left, right, torch.linalg.vector_norm(left, dim=1, keepdim=True),
                   torch.linalg.vector_norm(right, dim=0, keepdim=True))
            self._pairs[key] = hit
        return hit

    def _lokr_factor(self, keys: tuple[str, ...]) -> tuple[Tensor, Tensor, int]:
        """(w, |a| @ |b| or |w|, inner length) of a LoKr factor saved whole or as a @ b."""
        parts = [self.src.factor(k) for k in keys]
        if len(parts) == 1:
            return parts[0], parts[0].abs(), 0
        return parts[0] @ parts[1], parts[0].abs() @ parts[1].abs(), parts[0].shape[1]

    def _tokens(self, op: TokenRows, x: Tensor, e: Tensor | None, r0: int, r1: int) -> None:
        values = self.src.factor(op.key)
        base_dtype = DTYPES[op.base_dtype]
        last = {row: j for j, row in enumerate(op.indices)}  # a repeated index: the later row wins
        for row, j in last.items():
            if r0 <= row < r1:
                # the saved rows are new values (not deltas), cast to the base dtype first [10.2]
                x[row - r0] = values[j].to(base_dtype).to(F64)
                if e is not None:
                    e[row - r0] = 0.0

    def _dora_cols(self, i: int, op: DoraCols, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """[8] Conv1D / embedding: the norm of each column runs over every row (computed before the block)."""
        norm, e_norm = self._col_norms[i]
        m = self.src.factor(op.key).reshape(1, -1)
        return _dora(x, e, m, norm, e_norm, self.rows)


def _add_product(x: Tensor, e: Tensor, pair: tuple[Tensor, Tensor, Tensor, Tensor], i0: int, i1: int, scale: float,
                 ws: Workspace, extra: int = 0) -> tuple[Tensor, Tensor]:
    """x += s * left[i0:i1] @ right in place, and e += its float32 bound: the dot products (length k) plus the
    scale, its rounding and the addition (`extra` more roundings of the factors themselves, e.g. VeRA's lambdas).

    sum_j |left_ij| |right_jk| is bounded by ||left_i|| * ||right_:k|| (Cauchy-Schwarz): a rank-one product
    instead of a second matmul, at most sqrt(k) times looser.
    """
    left, right, left_norms, right_norms = pair
    left, left_norms = left[i0:i1], left_norms[i0:i1]
    tmp = ws.get("tmp", x.shape)
    absx = ws.get("absx", x.shape)
    torch.mul(left_norms, right_norms, out=tmp)
    tmp.mul_(abs(scale)).add_(torch.abs(x, out=absx)).mul_(_gamma(left.shape[1] + 3 + extra))
    e.add_(tmp)
    torch.mm(left, right, out=tmp)
    x.add_(tmp, alpha=scale)
    return x, e


def _dora(x: Tensor, e: Tensor, m: Tensor, norm: Tensor, e_norm: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """DoRA `V * (m / ||V||)` with the norm along the axis `norm` was taken on (n terms), and its float32 bound:
    the norm is off by the error already in V plus n roundings, the quotient and product by one each."""
    d_norm = e_norm + _gamma(n + 2) * (norm + e_norm)
    rel = d_norm / (norm - d_norm).clamp_min(torch.finfo(F64).tiny) + _gamma(2)
    f = m / norm
    y = x * f
    return y, f.abs() * (1 + rel) * e + y.abs() * (rel + _gamma(1))


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
