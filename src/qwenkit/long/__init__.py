"""Long documents beyond one context: token-boundary segmentation with overlap and map-reduce."""
from qwenkit.long.map_reduce import MapReduceResult, map_reduce, split_segments

__all__ = ["MapReduceResult", "map_reduce", "split_segments"]
