"""Quantize / dequantize reference functions (pure torch, any device, no packing).

Two weight formats, both stored in a canonical, kernel-independent layout (what checkpoints hold):

* **int8 per output channel, symmetric**: ``q = round(w / s)`` clamped to [-127, 127] with
  ``s = max|w_row| / 127``; ``w ≈ q * s``. ``qweight`` int8 (N, K), ``scales`` fp32 (N,).
* **int4 group-wise, asymmetric** (torch's int4 kernels need the zero point): per group of
  ``g`` input columns, ``s = (max - min) / 15``, ``q = round((w - min) / s)`` in [0, 15];
  ``w ≈ (q - 8) * s + z`` with ``z = min + 8 s`` — the "float zero" form that
  ``_weight_int4pack_mm*`` uses. ``qweight`` uint8 (N, K/2), low nibble = even column;
  ``scales``/``zeros`` fp32 (N, K/g).

Scales and zeros are rounded to bf16 values (kept as fp32) *before* the codes are computed, so
the bf16-activation kernels see exactly the canonical weights. The kernels in
`qwenkit.quant.kernels` repack these; every fast path is tested against
`dequantize_*` followed by an fp32 matmul.
"""
from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bf16 value, kept in fp32: the bf16 kernels then see exact scales."""
    return t.to(torch.bfloat16).float()


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> qweight int8 (N, K), scales fp32 (N,)."""
    w = w.float()
    amax = w.abs().amax(dim=1)  # (N,)
    scales = _bf16_exact((amax / 127.0).clamp(min=1e-10))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (N, K), scales (N,) -> fp32 (N, K)."""
    return qweight.float() * scales.float()[:, None]


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> qweight uint8 (N, K/2), scales fp32 (N, K/g), zeros fp32 (N, K/g)."""
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide in_features {k}")
    g = w.float().reshape(n, k // group_size, group_size)  # (N, G, g)
    wmin, wmax = g.amin(-1), g.amax(-1)  # (N, G)
    scales = _bf16_exact(((wmax - wmin) / 15.0).clamp(min=1e-10))
    zeros = _bf16_exact(wmin + 8.0 * scales)
    q = torch.round((g - zeros[..., None]) / scales[..., None] + 8.0).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
    return packed, scales, zeros


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 codes (N, K) in [0, 15]."""
    lo, hi = qweight & 0xF, qweight >> 4
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Canonical int4 -> fp32 (N, K): (q - 8) * s + z per group."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    q = q.reshape(n, groups, k // groups)  # (N, G, g)
    w = (q - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def quantize_int8_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding table (V, H) -> int8 rows + one scale per row (same math as per channel)."""
    return quantize_int8_per_channel(table)
