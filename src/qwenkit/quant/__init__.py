"""Weight quantization for the CPU (and CUDA) runtime: int8 per channel, int4 group-wise, mixed
policies, applied by swapping modules after construction; quality report. Quantized checkpoints
are a file format: `qwenkit.loaders.quantized`.

    from qwenkit.quant import quantize_model
    quantize_model(model, "int8")            # or "int4-g32", "mixed", "int4-g32,lm_head=int8"

See `policy.py` for the method names and `auto`, `linear.py` for how kernels are picked.
"""
from __future__ import annotations

from qwenkit.quant.convert import quantize_model, set_small_m, weight_bytes
from qwenkit.quant.embedding import Int8Embedding
from qwenkit.quant.linear import Int4Linear, Int8Linear, QuantizedLinear
from qwenkit.quant.policy import METHODS, QuantPolicy, method_names, parse, resolve_method

__all__ = [
    "METHODS",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "QuantPolicy",
    "QuantizedLinear",
    "method_names",
    "parse",
    "quantize_model",
    "resolve_method",
    "set_small_m",
    "weight_bytes",
]
