"""Quantized base checkpoints the merge reads: one module per format, and the registry that picks one.

`read_quantized` recognises the checkpoint (`io/quantized.py: detect`, from the headers and config.json), checks
that config.json and the tensors agree, and returns each quantized group as the logical tensor it stands for
(`QuantTensor`). Formats: FP8 block-wise (fp8_block.py), compressed-tensors FP8 (ct_fp8.py), MXFP4 (mxfp4.py),
bitsandbytes 4-bit (bnb4.py) and LLM.int8 (bnb8.py). Anything else quantized is refused before a byte is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedError
from ..quantized import config_scheme, detect, refusal
from . import bnb4, bnb8, ct_fp8, fp8_block, mxfp4
from .base import QuantFormat, QuantRole, QuantTensor, Requantizer, RequantReport, RowSource

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

__all__ = [
    "FORMATS", "QuantFormat", "QuantRole", "QuantTensor", "QuantizedBase", "RequantReport", "Requantizer",
    "RowSource", "read_quantized",
]

FORMATS: tuple[QuantFormat, ...] = (fp8_block.FORMAT, ct_fp8.FORMAT, mxfp4.FORMAT, bnb4.FORMAT, bnb8.FORMAT)

SUPPORTED = ("FP8 block-wise (DeepSeek-V3/R1, Kimi K2, Qwen3-FP8), compressed-tensors FP8 per channel or per tensor, "
             "MXFP4 (GPT-OSS) and bitsandbytes nf4/fp4/LLM.int8")


@dataclass(frozen=True)
class QuantizedBase:
    """A quantized checkpoint as the merge reads it."""

    scheme: str                         # as config.json describes it, e.g. "FP8 block-wise"
    fmt: QuantFormat
    tensors: dict[str, QuantTensor]     # logical name -> its groups, in checkpoint order
    config: Mapping[str, Any]           # quantization_config


def read_quantized(ckpt: Checkpoint, config: Mapping[str, Any]) -> QuantizedBase | None:
    """The quantization of `ckpt` (None for a full-precision one); UnsupportedError for a scheme, a layout or a
    config/tensor disagreement the merge cannot read exactly, naming it."""
    found = detect(ckpt.tensors, config)
    if found is None:
        return None
    declared = config_scheme(config)
    if declared is None:
        raise UnsupportedError(refusal(found, ckpt.root, ckpt.tensors) + ": config.json has no "
                               "quantization_config, so no loader would dequantize these tensors; re-download the "
                               "checkpoint with its config.json")
    if not found.groups:
        raise UnsupportedError(refusal(found, ckpt.root, ckpt.tensors) + ": config.json says the weights are "
                               "quantized but no tensor is; fix config.json or the weights")
    fmt = next((f for f in FORMATS if f.accepts(declared[0])), None)
    if fmt is None:
        raise UnsupportedError(refusal(found, ckpt.root, ckpt.tensors) + f": streammerge reads {SUPPORTED}. Merge "
                               "into the full-precision (bf16/f16/f32) model the quantized one was made from")
    if "quantization_config" not in config:
        raise UnsupportedError(f"base {ckpt.root}: config.json describes its quantization under the legacy key "
                               "'compression_config'; re-save the checkpoint with a current llm-compressor or "
                               "transformers so that it reads 'quantization_config'")
    tensors = fmt.tensors(list(found.groups), ckpt.tensors, config, ckpt.root)
    return QuantizedBase(declared[0], fmt, {t.name: t for t in tensors}, declared[1])
