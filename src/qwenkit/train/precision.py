"""Mixed precision for training: which compute dtype a machine gets, the autocast context, and
the machine's measured GEMM peak (for the MFU estimate).

`precision=auto` picks bf16 autocast (fp32 master weights, fp32 optimizer) on CUDA with bf16 and
on CPUs with native bf16 dot products (AMX-BF16, or AVX512-BF16: oneDNN's bf16 GEMM is ~5x its
fp32 GEMM on such a Zen 4, ~7x with AMX); fp32 on AVX2-only CPUs, where bf16 is emulated
(measured: docs/benchmarks.md, `qwenkit bench train`).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from qwenkit.cpu.build import cpu_flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    flags = cpu_flags()
    return "bf16" if "amx_bf16" in flags or "avx512_bf16" in flags else "fp32"


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def peak_flops(precision: str, device: torch.device) -> float:
    """FLOP/s of a large GEMM in the training dtype, measured once (~1 s): the MFU denominator."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = (1024, 2048, 4096) if device.type == "cpu" else (8192, 8192, 8192)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0)


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen linear weights (LoRA's base model) in the autocast dtype.

    Autocast would round them to `dtype` at every use anyway (same values), so this only drops
    the per-step casts and halves their memory. Embeddings and norms stay fp32 (they are not
    autocast), and so does a LM head tied to the embedding. Returns the number of weights cast.
    """
    tied = None
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if emb is not None:
        tied = emb.weight
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not tied:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            n += 1
    return n
