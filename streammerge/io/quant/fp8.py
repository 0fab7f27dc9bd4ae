"""FP8 (e4m3) arithmetic shared by the FP8 formats: per-block scaling of dequantized rows, and quantization of float32
rows with fresh scales.

The quantizer is transformers' `Fp8Quantize._quantize_one` (what its FP8 loader inverts): per block, amax in
float32; `scale = 448 / amax` (1 for an all-zero block); `q = clamp(w * scale, +-448)` cast to e4m3 (round to nearest
even); the stored `weight_scale_inv` is `1 / scale`. Partial edge blocks are quantized as if zero-padded to whole
blocks (padding cannot change a block's max). A 16-bit stored scale is rounded to its dtype first and the block is
divided by the rounded value, so dequantization (`q * scale_inv`) stays consistent.
"""

from __future__ import annotations

import torch

from ...errors import NumericError

E4M3 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(E4M3).max   # 448.0, a Python float as in transformers
FP8_MIN = torch.finfo(E4M3).min


_PAIRS: torch.Tensor | None = None
_UINT16 = getattr(torch, "uint16", None)


def _pair_table() -> torch.Tensor:
    """The float32 values of every pair of e4m3 codes (little-endian byte pair -> two float32), as int64."""
    global _PAIRS
    if _PAIRS is None:
        one = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
        idx = torch.arange(65536, dtype=torch.int32)
        _PAIRS = torch.stack([one[idx & 0xFF], one[idx >> 8]], dim=1).contiguous().view(torch.int64).reshape(-1)
    return _PAIRS


def decode(q: torch.Tensor, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`out.copy_(q)` for e4m3 codes `q`: the same float32 values, looked up two codes at a time (torch's own
    e4m3 -> float32 cast runs at ~3 ns a value on this kind of CPU, the lookup at ~1.5). `index` is an int32
    scratch of at least `q.numel() // 2` values."""
    n = q.numel()
    if n < 2 or not q.is_contiguous() or q.data_ptr() % 2:
        return out.copy_(q)
    half = n // 2
    flat = out.view(-1)
    i = index[:half]
    pairs = q.reshape(-1)[:2 * half]
    if _UINT16 is not None:
        i.copy_(pairs.view(_UINT16))
    else:  # torch < 2.3: no uint16; the sign-extended int16 masked back
        i.copy_(pairs.view(torch.int16)).bitwise_and_(0xFFFF)
    torch.index_select(_pair_table(), 0, i, out=flat[:2 * half].view(torch.int64))
    if n % 2:
        flat[-1:].copy_(q.reshape(-1)[-1:])
    return out


def scale_blocks(out: torch.Tensor, s: torch.Tensor, r0: int, bm: int, bn: int) -> torch.Tensor:
    """`out[i, j] *= s[(r0 + i) // bm - r0 // bm, j // bn]` in place: rows r0.. of a tensor viewed `[rows, cols]`,
    `s` the float32 scale rows from `r0 // bm` on. One float32 product per element, as transformers' loader."""
    n, cols = out.shape
    full, rem = divmod(cols, bn)
    base = r0 // bm
    row = 0
    while row < n:
        k = (r0 + row) // bm - base
        if (r0 + row) % bm == 0 and n - row >= bm:
            g = (n - row) // bm  # a run of whole blocks of rows: one broadcast product
            seg = out[row:row + g * bm].view(g, bm, cols)
            sk = s[k:k + g]
            if full:
                seg[..., :full * bn].unflatten(-1, (full, bn)).mul_(sk[:, None, :full, None])
            if rem:
                seg[..., full * bn:].mul_(sk[:, None, full:full + 1])
            row += g * bm
            continue
        stop = min(n, (base + k + 1) * bm - r0)
        seg = out[row:stop]
        if full:
            seg[:, :full * bn].unflatten(-1, (full, bn)).mul_(s[k, None, :full, None])
        if rem:
            seg[:, full * bn:].mul_(s[k, full:full + 1])
        row = stop
    return out


def _abs_max(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max |x| over `dims` without a second full-size tensor (max of the max and of minus the min)."""
    return torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg())


def block_scales(amax: torch.Tensor, scale_dtype: torch.dtype, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the multiplier each block is quantized with, the stored `weight_scale_inv` in `scale_dtype`) from each
    block's amax, as transformers' Fp8Quantize computes them."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scales = FP8_MAX / safe
    scales = torch.where(amax > 0, scales, torch.ones_like(scales))  # keep zero blocks stable
    inv = (1.0 / scales).to(torch.float32)
    if scale_dtype != torch.float32:
        inv = inv.to(scale_dtype)
        scales = 1.0 / inv.float()  # only to check it below: 16-bit scales divide by the rounded value
    if not bool(torch.isfinite(scales).all()) or not bool((inv != 0).all()):
        raise NumericError(f"{name}: a block's largest merged value is too small to scale into FP8 "
                           f"({float(amax[amax > 0].min())}); use a full-precision --dtype")
    return scales, inv


def quantize_blocks(w: torch.Tensor, bm: int, bn: int, scale_dtype: torch.dtype, q: torch.Tensor,
                    scratch: torch.Tensor, pad: torch.Tensor | None, index: torch.Tensor,
                    name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 rows `w [n, cols]` (whose first row starts a block of rows) into `q` (e4m3, same shape)
    with a fresh scale per `bm x bn` block. `scratch` holds `n_pad * cols_pad` float32 values, `pad` (as large, or
    None when the rows and columns are whole blocks) a zero-padded copy, `index` `n * cols // 2` int32 (`decode`).
    Returns (the scale rows `[ceil(n/bm), ceil(cols/bn)]` in `scale_dtype`, `q * scale` in float32 as a view of
    `scratch`)."""
    n, cols = w.shape
    rb, cb = -(-n // bm), -(-cols // bn)
    x = w
    if rb * bm != n or cb * bn != cols:
        assert pad is not None
        x = pad[:rb * bm * cb * bn].view(rb * bm, cb * bn)
        x.zero_()
        x[:n, :cols].copy_(w)
    x4 = x.view(rb, bm, cb, bn)
    scales, inv = block_scales(_abs_max(x4, (1, 3)), scale_dtype, name)
    y = scratch[:rb * bm * cb * bn].view(rb, bm, cb, bn)
    if scale_dtype == torch.float32:
        torch.mul(x4, scales[:, None, :, None], out=y)
    else:
        torch.div(x4, inv.float()[:, None, :, None], out=y)
    y.clamp_(FP8_MIN, FP8_MAX)
    q.copy_(y.view(rb * bm, cb * bn)[:n, :cols])
    # what a loader dequantizes the block to, for the error report
    dq = decode(q, scratch[:n * cols].view(n, cols), index)
    scale_blocks(dq, inv.float(), 0, bm, bn)
    return inv, dq


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, scratch: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """`q = e4m3(clamp(w / scale, +-448))` for a scale per row (`[n, 1]`) or one for all (`[1]`), float32 maths;
    returns `q * scale` in float32 (a view of `scratch`; `index` as for `decode`)."""
    n, cols = w.shape
    y = scratch[:n * cols].view(n, cols)
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    torch.div(w, s, out=y)
    y.clamp_(FP8_MIN, FP8_MAX)
    q.copy_(y)
    return decode(q, y, index).mul_(s)


def row_amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| of each row, float32 `[n]`."""
    return _abs_max(w, (1,))
