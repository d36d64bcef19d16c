"""qwenkit's own CPU kernels (AVX2 + FMA + OpenMP C, compiled at first use, called via ctypes).

* `build.lib()` — compiles every `csrc/*.c` into one shared library (cached by source hash).
* `ops` — fused elementwise and attention ops the model's layers call on CPU in inference
  (RMSNorm, SiLU·mul, in-place RoPE, single-query decode attention), with the torch expressions
  as the fallback everywhere else (autograd, CUDA, torch.compile, no compiler).
* The quantized GEMM kernels' Python side lives with the quantized layers (`qwenkit.quant.cgemv`).
"""
