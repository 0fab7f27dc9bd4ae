"""streammerge: merge a LoRA adapter into a safetensors checkpoint without instantiating the model."""

import warnings

# numpy is not a dependency (nothing here uses it); torch warns on import when it is absent
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .api import MergeSummary, merge  # noqa: E402
from .errors import StreamMergeError  # noqa: E402

__all__ = ["MergeSummary", "StreamMergeError", "merge"]
__version__ = "0.1.0"
