"""The engine: each output tensor read, computed in float32 row blocks and rounded once (rows.py), streamed into
its shard with disk waits overlapping the math (stream.py, pipeline.py)."""

from .rows import TensorRows, block_rows, merged_rows, one_torch_thread
from .stream import write_shards

__all__ = ["TensorRows", "block_rows", "merged_rows", "one_torch_thread", "write_shards"]
