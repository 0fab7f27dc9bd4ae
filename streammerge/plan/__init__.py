"""Planning: the whole merge decided from headers and configs before any weight is read.

keys.py turns adapter keys into modules, tied.py decides tied embeddings, replacements.py plans full
replacements, build.py puts it together and calls each module's tuner (streammerge.tuners).
"""

from .build import build_plan
from .model import OutTensor, Plan, Problems

__all__ = ["OutTensor", "Plan", "Problems", "build_plan"]
