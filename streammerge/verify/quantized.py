"""verify on quantized bases: the dequantized base values in float64, and the check of re-quantized (--dtype keep)
tensors.

The dequantization here is written again from each format's definition (docs/quantized-formats.md), in float64
with the roundings transformers' loaders make spelled out, and reads through the safetensors library; it shares
nothing with `io/quant` but the plan (which disk tensors make a logical one, the block size, the strategy).

A re-quantized tensor is stored as e4m3 codes `q` and fresh scales `s`; what a loader computes is `q * s`. It is
correct when, elementwise, `|q * s - x| <= e + s * h(|x| + e) / s)` where `x` is the float64 merge, `e` the float32
bound of the merge (as for any merged tensor) and `h(v)` half the e4m3 spacing at `v` (`2**(max(floor(log2 v), -6)
- 4)`: 3 mantissa bits, subnormal below 2**-6), plus a few float32 roundings of the products; and when each
scale is fresh: `448 * s` is the largest `|x|` it covers, to the precision of the scale's dtype. A copied scale
or a flipped code is caught; any consistent re-quantization of the merge passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..bounds import F64
from ..io.quant import QuantTensor

if TYPE_CHECKING:
    from ..plan import OutTensor
    from .reference import Sources

E4M3_MAX = 448.0
F32_ROUNDINGS = 8 * 2.0 ** -24  # the products w * scale, 1 / scale, q * scale: a few float32 roundings, doubled
_SCALE_PRECISION = {torch.float32: 2.0 ** -21, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
_MXFP4 = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
                      dtype=F64)


def _f32(x: Tensor) -> Tensor:
    """Round float64 values to float32 (what one float32 operation on exact inputs gives) and back."""
    return x.to(torch.float32).to(F64)


def dequantized_rows(qt: QuantTensor, src: Sources, per_index: int, cols: int, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of the logical tensor viewed `[-1, cols]` (`per_index` rows per index of dim 0), float64
    holding the float32 values transformers' loader computes."""
    kind = type(qt.fmt).__name__
    if kind == "Mxfp4":
        return _mxfp4(qt, src, per_index, cols, r0, r1)
    assert per_index == 1 and cols == qt.shape[1], f"{qt.name}: 2-D rows expected"
    if kind == "Fp8Block":
        return _fp8_block(qt, src, r0, r1)
    if kind == "CompressedFp8":
        return _compressed(qt, src, r0, r1)
    if kind == "Bnb4":
        return _bnb4(qt, src, r0, r1)
    if kind == "Bnb8":
        w = src.slice(qt.parts["weight"], r0, r1).to(F64)
        scb = src.slice(qt.parts["SCB"], r0, r1).to(F64).reshape(-1, 1)
        # bitsandbytes multiplies by the float32 constant 1/127, left to right, in float32
        return _f32(_f32(w * scb) * float(torch.tensor(7.874015718698502e-3, dtype=torch.float32)))
    raise AssertionError(f"{qt.name}: no reference for format {qt.fmt.name}")


def _block_scales(s: Tensor, rows: Tensor, cols: int, bm: int, bn: int, k0: int) -> Tensor:
    """Each element's scale: `s[row // bm - k0, col // bn]`, float64 `[len(rows), cols]`."""
    return s[(rows // bm - k0)][:, torch.arange(cols) // bn]


def _scale_values(s: Tensor) -> Tensor:
    return torch.exp2(s.to(F64) - 127) if s.dtype == torch.uint8 else s.to(F64)


def _fp8_block(qt: QuantTensor, src: Sources, r0: int, r1: int) -> Tensor:
    bm, bn = qt.meta["block"]
    w, s_info = qt.parts["weight"], qt.parts["weight_scale_inv"]
    q = src.slice(w, r0, r1).to(F64)
    if s_info.shape in ((), (1,)):
        return _f32(q * _scale_values(src.slice(s_info, 0, 1)).reshape(1, 1))
    k0 = r0 // bm
    s = _scale_values(src.slice(s_info, k0, -(-r1 // bm)))
    return _f32(q * _block_scales(s, torch.arange(r0, r1), q.shape[1], bm, bn, k0))


def _compressed(qt: QuantTensor, src: Sources, r0: int, r1: int) -> Tensor:
    s_info = qt.parts["weight_scale"]
    q = src.slice(qt.parts["weight"], r0, r1).to(F64)
    if qt.meta["strategy"] == "channel":
        s = src.slice(s_info, r0, r1).to(F64).reshape(-1, 1)
    else:
        s = src.slice(s_info, 0, s_info.rows).to(F64).reshape(1, 1)
    x = q * s  # exact: 4 x (8 or 11 or 24) significant bits
    if qt.meta["dense"] and s_info.dtype != "F32":
        return x.to(s_info.torch_dtype).to(F64)  # compressed-tensors multiplies in the scale's dtype
    return _f32(x)


def _bnb4(qt: QuantTensor, src: Sources, r0: int, r1: int) -> Tensor:
    cols, bs = qt.shape[1], qt.meta["blocksize"]
    e0, e1 = r0 * cols, r1 * cols
    if e1 == e0:
        return torch.zeros(r1 - r0, cols, dtype=F64)
    w = qt.parts["weight"]
    b0, b1 = e0 // 2, -(-e1 // 2)
    per = w.row_nbytes
    raw = src.slice(w, b0 // per, -(-b1 // per)).contiguous().view(torch.uint8).reshape(-1)
    raw = raw[b0 - b0 // per * per:b1 - b0 // per * per].to(torch.int64)
    codes = torch.stack((raw // 16, raw % 16), dim=1).reshape(-1)[e0 - 2 * b0:e1 - 2 * b0]
    code = src.slice(qt.parts["quant_map"], 0, 16).to(F64)
    j0, j1 = e0 // bs, -(-e1 // bs)
    absmax = src.slice(qt.parts["absmax"], j0, j1)
    if qt.meta["nested"]:
        nb = qt.meta["nested_blocksize"]
        nested = src.slice(qt.parts["nested_absmax"], j0 // nb, -(-j1 // nb)).to(F64)
        nested_code = src.slice(qt.parts["nested_quant_map"], 0, qt.parts["nested_quant_map"].rows).to(F64)
        scale = nested[torch.arange(j0, j1) // nb - j0 // nb]
        offset = float(torch.tensor(qt.meta["offset"], dtype=torch.float32))
        absmax = _f32(_f32(nested_code[absmax.to(torch.int64)] * scale) + offset)
    element_absmax = absmax.to(F64)[torch.arange(e0, e1) // bs - j0]
    x = _f32(code[codes] * element_absmax)
    return x.to(qt.meta["dtype"]).to(F64).reshape(r1 - r0, cols)


def _mxfp4(qt: QuantTensor, src: Sources, per_index: int, cols: int, r0: int, r1: int) -> Tensor:
    """The logical `[E, in, out]` is each expert's `[out, in]` on disk, transposed; rows of either view."""
    blocks_info, scales_info = qt.parts["blocks"], qt.parts["scales"]
    n_in = qt.shape[1]
    out = torch.empty(r1 - r0, cols, dtype=F64)
    if per_index == 1:  # rows are whole experts
        for e in range(r0, r1):
            out[e - r0] = _mxfp4_expert(src, blocks_info, scales_info, e, 0, n_in).T.reshape(-1)
        return out
    row = r0
    while row < r1:  # rows of the [E * in, out] view: input features of one expert at a time
        e, i0 = divmod(row, n_in)
        i1 = min(n_in, i0 + r1 - row)
        out[row - r0:row - r0 + i1 - i0] = _mxfp4_expert(src, blocks_info, scales_info, e, i0, i1).T
        row += i1 - i0
    return out


def _mxfp4_expert(src: Sources, blocks_info, scales_info, e: int, i0: int, i1: int) -> Tensor:
    """Expert `e`'s `[out, i1 - i0]`: input features [i0, i1) of every output row."""
    g0, g1 = i0 // 32, -(-i1 // 32)
    blocks = src.slice(blocks_info, e, e + 1)[0][:, g0:g1].to(torch.int64)    # [out, g, 16]
    scales = src.slice(scales_info, e, e + 1)[0][:, g0:g1].to(F64)            # [out, g]
    vals = torch.stack((_MXFP4[blocks % 16], _MXFP4[blocks // 16]), dim=-1).reshape(blocks.shape[0], g1 - g0, 32)
    vals = vals * torch.exp2(scales - 127).unsqueeze(-1)
    return vals.reshape(blocks.shape[0], -1)[:, i0 - g0 * 32:i1 - g0 * 32]


# ------------------------------------------------------------------------------------------------------------
# --dtype keep: re-quantized tensors


def _half_step(v: Tensor) -> Tensor:
    """Half the e4m3 spacing at |v| (float64)."""
    exp = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -30))).clamp_min(-6)
    return torch.exp2(exp - 4)


def check_requantized(t: OutTensor, codes: Tensor, scale: Tensor, reference, sample: Callable[[int, int], bool],
                      block_rows: int) -> tuple[int, int, str]:
    """(excess in e4m3 steps, rows checked, where) for the re-quantized weight `codes` (its output view, `[R, C]`
    e4m3) with its output `scale`, against `reference` (a TensorReference of `t`)."""
    assert t.quant is not None
    qt = t.quant.tensor
    rows, cols = codes.shape
    block = qt.meta.get("block")
    bm, bn = block if block is not None else (1, cols)
    step = max(bm, block_rows // bm * bm)
    worst, detail, checked = 0, "", 0
    precision = _SCALE_PRECISION[scale.dtype]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if not sample(r0, r1):
            continue
        if reference.exact:
            x, e = reference.source(r0, r1).to(F64), torch.zeros(r1 - r0, cols, dtype=F64)
        else:
            x, e = (a.clone() for a in reference.block(r0, r1))
        s = _element_scales(qt, scale, r0, r1, cols, bm, bn)
        dq = codes[r0:r1].to(F64) * s
        allowed = e + s * _half_step((x.abs() + e) / s) + F32_ROUNDINGS * (x.abs() + e)
        excess = (dq - x).abs() - allowed
        bad = float(excess.max()) if excess.numel() else 0.0
        if bad > 0:
            i, j = divmod(int(excess.argmax()), cols)
            steps = max(1, math.ceil(bad / float(2 * s[i, j] * _half_step((x[i, j].abs() + e[i, j]) / s[i, j]))))
            if steps > worst:
                worst, detail = steps, (f"row {r0 + i}, column {j}: dequantized {float(dq[i, j])!r} (code "
                                        f"{float(codes[r0 + i, j])!r} x scale {float(s[i, j])!r}), float64 "
                                        f"reference {float(x[i, j]):.9g}, allowed +-{float(allowed[i, j]):.3g}")
        stale = _stale_scale(x, e, s, precision, qt, r0, r1, bm, bn)
        if stale and worst == 0:
            worst, detail = 1, stale
        checked += r1 - r0
    return worst, checked, detail


def _element_scales(qt: QuantTensor, scale: Tensor, r0: int, r1: int, cols: int, bm: int, bn: int) -> Tensor:
    s = scale.to(F64)
    if "block" in qt.meta:
        return _block_scales(s[r0 // bm:-(-r1 // bm)], torch.arange(r0, r1), cols, bm, bn, r0 // bm)
    if qt.meta["strategy"] == "channel":
        return s.reshape(-1, 1)[r0:r1].expand(r1 - r0, cols)
    return s.reshape(1, 1).expand(r1 - r0, cols)


def _stale_scale(x: Tensor, e: Tensor, s: Tensor, precision: float, qt: QuantTensor, r0: int, r1: int, bm: int,
                 bn: int) -> str:
    """Where a scale is not the fresh one (448 * s = the largest |x| it covers), or "". A per-tensor scale covers
    rows outside this block: it is checked by the elementwise bound only."""
    if qt.meta.get("strategy") == "tensor":
        return ""
    n, cols = x.shape
    rb, cb = -(-n // bm), -(-cols // bn)

    def block_max(v: Tensor) -> Tensor:
        padded = torch.zeros(rb * bm, cb * bn, dtype=F64)
        padded[:n, :cols] = v
        return padded.view(rb, bm, cb, bn).amax(dim=(1, 3))

    amax, emax = block_max(x.abs() + e), block_max(e)
    have = s[::bm, ::bn] * E4M3_MAX
    # an all-zero block (or one the float32 bound cannot tell from zero) is consistent with any scale
    stale = ((have - amax).abs() > amax * (precision + 2.0 ** -20) + 2 * emax) & (amax > 2 * emax) & (amax > 0)
    if not bool(stale.any()):
        return ""
    i, j = (int(v) for v in stale.nonzero()[0])
    return (f"rows {r0 + i * bm}.., columns {j * bn}..: scale {float(s[i * bm, j * bn])!r} covers values up to "
            f"{float(have[i, j]):.6g}, but the block's largest merged value is {float(amax[i, j]):.6g}: the scale "
            "was not computed afresh")


__all__ = ["check_requantized", "dequantized_rows"]
