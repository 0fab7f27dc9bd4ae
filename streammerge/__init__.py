"""streammerge: merge a LoRA adapter into a safetensors checkpoint without instantiating the model."""

from .api import MergeSummary, merge
from .errors import StreamMergeError

__all__ = ["MergeSummary", "StreamMergeError", "merge"]
__version__ = "0.1.0"
