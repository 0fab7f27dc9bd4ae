"""Facts about the safetensors format and the files of a transformers model folder, shared by readers and writers."""

from __future__ import annotations

import torch
from huggingface_hub.constants import (
    CONFIG_NAME,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_SINGLE_FILE,
)

__all__ = [
    "CONFIG_NAME", "DTYPES", "DTYPE_NAMES", "FLOAT_DTYPES", "ITEMSIZE", "SAFETENSORS_INDEX_FILE",
    "SAFETENSORS_SINGLE_FILE", "SAVE_ORDER", "SUBBYTE", "TORCH_TO_ST",
]

# torch dtypes that may be missing on older torch versions (pyproject admits torch >= 2.1).
_OPTIONAL = {
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

# safetensors dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
}
DTYPES.update({st: getattr(torch, name) for st, name in _OPTIONAL.items() if hasattr(torch, name)})

ITEMSIZE: dict[str, int] = {st: torch.empty((), dtype=dt).element_size() for st, dt in DTYPES.items()}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in DTYPES.items()}

# Sub-byte safetensors dtypes: valid files, but their shapes count 4/6-bit elements that torch cannot view.
SUBBYTE = ("F4", "F6_E2M3", "F6_E3M2")

# the floating-point dtypes a merge computes in and can write
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# how config.json names them (`torch_dtype` / `dtype`)
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

# safetensors' Rust `Dtype` enum in declaration order. save_file sorts tensors by this enum, descending, then by
# name (byte order), which also puts wider types first so every tensor is aligned.
SAVE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
