"""streammerge: merge a LoRA adapter into a safetensors checkpoint without instantiating the model."""

import sys as _sys
import types as _types
import warnings as _warnings

from .errors import StreamMergeError

# numpy is not a dependency (nothing here uses it); torch warns on import when it is absent
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = ["MergeSummary", "StreamMergeError", "merge"]
__version__ = "0.1.0"


class _Package(_types.ModuleType):
    """The merge engine (and torch) is imported on first use: `streammerge --help` stays instant, and a Ctrl-C
    while torch loads reaches the command line's handler instead of printing a traceback."""

    @property
    def merge(self):
        if "_merge" in self.__dict__:
            return self.__dict__["_merge"]
        from .api import merge

        return merge

    @merge.setter
    def merge(self, value) -> None:
        # importing the submodule streammerge.merge binds it here; the function keeps the name, as it always has
        if not isinstance(value, _types.ModuleType):
            self.__dict__["_merge"] = value

    @property
    def MergeSummary(self):  # noqa: N802 - the class's name
        from .api import MergeSummary

        return MergeSummary


_sys.modules[__name__].__class__ = _Package
