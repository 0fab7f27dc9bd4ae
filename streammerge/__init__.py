"""streammerge: merge a LoRA adapter into a safetensors checkpoint without instantiating the model."""

from __future__ import annotations

import warnings as _warnings
from typing import Any

from .errors import StreamMergeError

# numpy is not a dependency (nothing here uses it); torch warns on import when it is absent
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = ["MergeSummary", "StreamMergeError", "merge"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the engine (and torch) is imported on first use: `streammerge --help` stays instant, and a Ctrl-C while
    # torch loads reaches the command line's handler instead of printing a traceback
    if name in ("merge", "MergeSummary"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
