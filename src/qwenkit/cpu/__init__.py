"""qwenkit's own CPU kernels (AVX2 / AVX512-VNNI + OpenMP C, compiled at first use, called
via ctypes) and the module swaps that put them into a model.

* `build.lib()` — compiles every `csrc/*.c` into one shared library (cached by source hash).
* `ops` — fused elementwise and attention ops (RMSNorm, SiLU·mul, in-place RoPE, single-query
  decode attention) with the torch expressions as the fallback everywhere else.
* `cgemv` — the quantized GEMM kernels' bindings (used by `qwenkit.quant`'s linears).
* `install(model)` (`runtime.py`) — swaps the fused modules (`modules.py`) and the one-call decode
  step (`decode_step.py`) into a model built from `qwenkit.model`.
"""
from __future__ import annotations

from qwenkit.cpu.runtime import install, uninstall

__all__ = ["install", "uninstall"]
