"""Fused CPU ops for inference: one C call instead of a chain of small eager torch ops.

In the decode step every tensor outside the big projections is a few KB, so each eager torch op
costs its dispatch and allocation, not its arithmetic, and a Qwen2 layer runs ~40 of them.
These ops (`csrc/ops_avx2.c`) do the same math in one pass:

* `rms_norm` — RMSNorm (HF numerics: fp32, x * rsqrt(mean(x^2) + eps), then * weight);
* `silu_and_mul` — SwiGLU's silu(gate) * up over the fused gate|up projection output;
* `rope_` — rotate_half RoPE applied in place to the q and k heads of the fused qkv output;
* `decode_attention` — one query per sequence over its cached keys (all of them visible), with
  GQA, reading keys through a block table (the engine's paged cache, or one block per sequence
  for a contiguous cache) — no gather copy, no mask.
* `paged_attention` — the same kernel for every query row of a step (prefill chunks and
  decodes): causal, each row over exactly its keys 0..position, so a row's result does not
  depend on chunking, prefix-cache hits or the batch (bit-identical to a decode row).
  Both also read int8 pools (`kv_cache_dtype="int8"`) with their per token-and-head scales.

`enabled(*tensors)` says when the fused modules (`modules.py`) may call them: CPU fp32 tensors, the library built, no
autograd graph to record (training keeps the torch expressions), and not under `torch.compile`
(inductor fuses the torch expressions itself). Everywhere else the callers run torch.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from qwenkit.cpu import build

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
ATTN_HEAD_DIMS = (64, 128)  # compiled into qk_attn_decode (query and output in registers)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = build.lib()
    if lib is None:
        return None
    lib.qk_rms_norm.argtypes = [_P, _P, _P, _I, _I, _F]
    lib.qk_silu_mul.argtypes = [_P, _P, _I, _I]
    lib.qk_rope.argtypes = [_P, _I, _I, _I, _I, _P, _P]
    lib.qk_attn_decode.argtypes = [_P, _I, _P, _P, _P, _P, _P, _I, _P, _I, _I, _P, _I, _I, _I, _I, _F]
    lib.qk_attn_paged.argtypes = [_P, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _P, _I, _I, _I, _I, _F]
    for f in (lib.qk_rms_norm, lib.qk_silu_mul, lib.qk_rope, lib.qk_attn_decode, lib.qk_attn_paged):
        f.restype = None
    return lib


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the fused C ops may replace the torch expressions for these tensors."""
    if _lib() is None or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # (called ~5 times per layer and token: only cheap attributes here)
        if not t.is_cpu or t.dtype is not torch.float32 or (grad and t.requires_grad):
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; x (..., H) fp32 -> (..., H)."""
    x = x.contiguous()
    h = x.shape[-1]
    y = torch.empty_like(x)
    _lib().qk_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // h, h, eps)
    return y


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> silu(gate_up[..., :I]) * gate_up[..., I:], (..., I)."""
    gate_up = gate_up.contiguous()
    i = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], i)
    _lib().qk_silu_mul(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * i), i)
    return y


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> bool:
    """Rotate heads 0..num_heads-1 of each row of x (..., W) in place (rows = tokens; the heads
    are the first num_heads * head_dim columns). cos/sin: one (head_dim,) row per token.
    Returns False (and does nothing) when the layouts do not fit; the caller then uses torch."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (
        x.stride(-1) != 1
        or not _rows_uniform(x)
        or cos.numel() != rows * head_dim
        or not (cos.is_contiguous() and sin.is_contiguous())
        or num_heads * head_dim > x.shape[-1]
    ):
        return False
    stride = x.stride(-2) if x.dim() >= 2 else x.shape[-1]
    _lib().qk_rope(x.data_ptr(), rows, stride, num_heads, head_dim, cos.data_ptr(), sin.data_ptr())
    return True


def _rows_uniform(x: torch.Tensor) -> bool:
    """The rows of x (all dims but the last) sit at one constant stride."""
    if x.dim() < 2:
        return True
    stride = x.stride(-2)
    expected = stride * x.shape[-2]
    for d in range(x.dim() - 3, -1, -1):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def _attn_layout_ok(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None, *index: torch.Tensor,
) -> bool:
    """The attention kernels' layouts: head_dim compiled in, whole GQA groups, q rows of
    contiguous heads, contiguous pools (fp32, or int8 with contiguous fp32 scales (blocks,
    block_size, Hkv)), int64 tables / lengths."""
    _, hq, d = q.shape
    if k_scale is None:
        pools_ok = k_cache.dtype == v_cache.dtype == torch.float32 and v_scale is None
    else:
        pools_ok = (
            k_cache.dtype == v_cache.dtype == torch.int8
            and v_scale is not None
            and all(s.dtype == torch.float32 and s.is_contiguous() and s.shape == k_cache.shape[:3]
                    for s in (k_scale, v_scale))
        )  # fmt: skip
    return (
        pools_ok
        and d in ATTN_HEAD_DIMS
        and hq % k_cache.shape[2] == 0
        and q.stride(2) == 1
        and q.stride(1) == d
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and all(t.dtype == torch.int64 for t in index)
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """q (S, Hq, D): one query per sequence; k_cache / v_cache (blocks, block_size, Hkv, D), fp32
    or int8 with k_scale / v_scale (blocks, block_size, Hkv) fp32;
    block_tables (S, max_blocks) int64; context_lens (S,) int64: sequence s attends to its
    first context_lens[s] cached positions, all visible. -> (S, Hq, D), or None when the layouts
    do not fit (the caller then uses torch)."""
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    if not _attn_layout_ok(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens):
        return None
    tables = block_tables.contiguous()
    ctx = context_lens.contiguous()
    out = q.new_empty(s, hq, d)
    bs = k_cache.shape[1]
    _lib().qk_attn_decode(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
        tables.data_ptr(), tables.shape[1], ctx.data_ptr(), bs * hkv * d, bs, out.data_ptr(), s, hq, hkv, d, scale,
    )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: torch.Tensor,
    *,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Causal attention of a step's query rows over the paged cache (their keys written already).

    q (N, Hq, D): the rows of S sequences in order, query_lens[s] (int64, sum N) each; sequence
    s's row i sits at position context_lens[s] - query_lens[s] + i and sees keys 0..that
    position; k_cache / v_cache (blocks, block_size, Hkv, D), fp32 or int8 with k_scale / v_scale
    (blocks, block_size, Hkv) fp32 (folded into the dot products and softmax weights); block_tables (S, max_blocks)
    int64. -> (N, Hq, D), or None when the layouts do not fit (the caller then uses torch).
    Each (row, head) runs the same arithmetic as `decode_attention` at that position."""
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    if not _attn_layout_ok(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, query_lens):
        return None
    tables = block_tables.contiguous()
    ctx = context_lens.contiguous()
    qlen = query_lens.contiguous()
    out = q.new_empty(n, hq, d)
    bs = k_cache.shape[1]
    _lib().qk_attn_paged(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
        tables.data_ptr(), tables.shape[1], ctx.data_ptr(), qlen.data_ptr(), bs * hkv * d, bs, out.data_ptr(),
        ctx.numel(), hq, hkv, d, scale,
    )  # fmt: skip
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
