"""Quantized checkpoints: which scheme, and which disk tensors hold each quantized weight.

A quantized checkpoint stores a weight as packed data plus quantization state (scales, code books, a packed
description), and config.json's `quantization_config` tells loaders how to read them. Casting such a tensor, or
copying it without that config, silently corrupts the model, so these tensors must be recognised from the
headers and config alone. `detect` says which scheme a base uses and groups its tensors by the weight they
encode (`QuantGroup`); `io/quant/` reads the groups of the schemes it supports and refuses the others.

Layouts recognised (as transformers 5 saves them):
* MXFP4 (GPT-OSS): `<param>_blocks` U8 `[..., n/32, 16]` and `<param>_scales` U8 `[..., n/32]`.
* bitsandbytes 4-bit: `<m>.weight` U8 `[n/2, 1]`, `.weight.absmax`, `.weight.quant_map`, with double quantization
  `.weight.nested_absmax` and `.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4|fp4`.
* bitsandbytes 8-bit: `<m>.weight` I8, `<m>.SCB` F32, `<m>.weight_format` U8.
* FP8 block-wise (DeepSeek-V3, Qwen3-FP8): `<m>.weight` F8_E4M3 and `<m>.weight_scale_inv` F32.
* compressed-tensors / FBGEMM: `<m>.weight` (F8 or integer) or `<m>.weight_packed`, with `<m>.weight_scale`,
  `weight_zero_point`, `weight_shape`, `weight_g_idx`, `input_scale`.
* GPTQ / AWQ: `<m>.qweight`, `qzeros`, `scales`, `g_idx`.
* anything else stored as F8/F6/F4, or a `*.weight` of an integer dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .formats import FLOAT_DTYPES

_LOW_FLOAT = ("F8", "F6", "F4")
_INT_DTYPES = {"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}

_BNB4_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB4_QUANT_STATE = re.compile(r"^(?P<w>.+)\.quant_state\.bitsandbytes__(?P<kind>nf4|fp4)$")
_COMPRESSED_PARTS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                     "input_scale", "input_zero_point", "output_scale")
# names that are quantization state wherever they appear (a float model has no such parameter)
_STATE_SUFFIXES = (
    *(f".{s}" for s in _BNB4_STATE), ".SCB", ".weight_format", ".weight_scale_inv", ".qzeros", ".g_idx",
)


class _Header(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class QuantGroup:
    """One quantized weight: the tensor it stands for and the disk tensors (by role) that encode it."""

    weight: str                      # the dequantized tensor's name, e.g. model.layers.0.self_attn.q_proj.weight
    scheme: str                      # e.g. "MXFP4", "bitsandbytes 4-bit (nf4)"
    parts: Mapping[str, str]         # role -> disk tensor: blocks/scales, weight/absmax/quant_map/..., weight/SCB


@dataclass(frozen=True)
class Quantization:
    """What `detect` found: the scheme, the quantized weights, and the config that says so (if any)."""

    scheme: str
    groups: tuple[QuantGroup, ...]
    config: Mapping[str, Any] | None

    @property
    def tensors(self) -> set[str]:
        """Every disk tensor that is packed quantized data or quantization state."""
        return {name for g in self.groups for name in g.parts.values()}

    def describe(self, headers: Mapping[str, _Header]) -> str:
        """One clause naming the scheme, an example tensor and the config: 'quantized (MXFP4: ...)'."""
        bits = []
        if self.groups:
            g = self.groups[0]
            role, name = next(iter(g.parts.items()))
            h = headers[name]
            what = "packed quantized data" if role in ("blocks", "weight", "weight_packed", "qweight") else \
                "quantization state"
            more = len(self.tensors) - 1
            of = f" of {g.weight}" if g.weight != name else ""
            bits.append(f"{name} is {h.dtype} {list(h.shape)}, {what}{of}"
                        + (f", and {more} more quantization tensor(s)" if more else ""))
        if self.config is not None:
            method = self.config.get("quant_method", "?")
            bits.append(f"config.json has quantization_config (quant_method {method!r})"
                        + ("" if self.groups else " though no tensor is packed"))
        return f"quantized ({self.scheme}: " + "; ".join(bits) + ")"


def config_scheme(config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """(scheme, quantization_config) when config.json says the weights are quantized, else None."""
    q = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(q, Mapping):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return f"bitsandbytes 4-bit {q.get('bnb_4bit_quant_type', 'fp4')}", q
        if q.get("load_in_8bit"):
            return "bitsandbytes 8-bit", q
        return None  # a leftover config with both flags off: the weights are plain
    names = {"mxfp4": "MXFP4", "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8", "gptq": "GPTQ", "awq": "AWQ",
             "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors"}
    scheme = names.get(method, method or "unknown method")
    if method == "fp8" and q.get("weight_block_size"):
        scheme = "FP8 block-wise"
    return scheme, q


def detect(headers: Mapping[str, _Header], config: Mapping[str, Any] | None = None) -> Quantization | None:
    """The quantization of a checkpoint from its tensor headers and config.json, or None for a plain one."""
    groups: dict[str, QuantGroup] = {}
    claimed: set[str] = set()

    def dtype(name: str) -> str:
        return headers[name].dtype if name in headers else ""

    def add(weight: str, scheme: str, parts: dict[str, str]) -> None:
        present = {role: n for role, n in parts.items() if n in headers and n not in claimed}
        if present and weight not in groups:
            groups[weight] = QuantGroup(weight, scheme, present)
            claimed.update(present.values())

    for name in headers:
        if name.endswith("_blocks") and dtype(name) == "U8" and dtype(name[:-7] + "_scales") == "U8":
            p = name[:-7]
            add(p, "MXFP4", {"blocks": name, "scales": p + "_scales"})
        elif m := _BNB4_QUANT_STATE.match(name):
            w = m["w"]
            add(w, f"bitsandbytes 4-bit {m['kind']}",
                {"weight": w, **{s: f"{w}.{s}" for s in _BNB4_STATE}, "quant_state": name})
        elif name.endswith(".SCB"):
            mod = name[:-4]
            add(f"{mod}.weight", "bitsandbytes 8-bit",
                {"weight": f"{mod}.weight", "SCB": name, "weight_format": f"{mod}.weight_format"})
        elif name.endswith(".weight_scale_inv"):
            mod = name[: -len(".weight_scale_inv")]
            add(f"{mod}.weight", "FP8 block-wise",
                {"weight": f"{mod}.weight", "weight_scale_inv": name, "input_scale": f"{mod}.input_scale",
                 "activation_scale": f"{mod}.activation_scale"})
        elif name.endswith(".qweight"):
            mod = name[: -len(".qweight")]
            parts = {"qweight": name, **{s: f"{mod}.{s}" for s in ("qzeros", "scales", "g_idx")}}
            add(f"{mod}.weight", "GPTQ/AWQ", parts)
    for name in headers:
        if name.endswith(".weight_scale") and name not in claimed:
            mod = name[: -len(".weight_scale")]
            w = dtype(f"{mod}.weight")
            if f"{mod}.weight_packed" in headers or (w and w not in FLOAT_DTYPES):
                kind = "FP8" if w.startswith("F8") else "INT8" if w == "I8" else "packed integer"
                add(f"{mod}.weight", f"{kind} (compressed-tensors)", {p: f"{mod}.{p}" for p in _COMPRESSED_PARTS})
    for name, h in headers.items():
        if name in claimed:
            continue
        if h.dtype.startswith(_LOW_FLOAT):
            add(name, h.dtype.split("_")[0], {"weight": name})
        elif name.endswith(_STATE_SUFFIXES) or (name.endswith(".weight") and h.dtype in _INT_DTYPES):
            add(name, "unknown scheme", {"weight": name})

    from_config = config_scheme(config or {})
    if not groups and from_config is None:
        return None
    ordered = tuple(groups.values())
    scheme = from_config[0] if from_config else "/".join(dict.fromkeys(g.scheme for g in ordered))
    return Quantization(scheme, ordered, from_config[1] if from_config else None)


def refusal(quant: Quantization, root: Path, headers: Mapping[str, _Header]) -> str:
    """The start of the message refusing a quantized base: 'base <root> is quantized (<scheme>: ...)'; the caller
    adds why."""
    return f"base {root} is {quant.describe(headers)}"
