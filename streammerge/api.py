"""The public Python API."""

from .merge import MergeSummary, merge

__all__ = ["MergeSummary", "merge"]
