"""The fast kernels behind the quantized linears, one small class per weight layout.

CPU facts that shape this file (measured, see docs in `qwenkit.quant.linear`):
- torch's weight-only kernels `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are fast only
  with **bf16 activations**; with fp32 activations they are 5–50× slower than an fp32 GEMM. So
  the small-M path casts x to bf16 around them (weights are exact in bf16: scales and zeros are
  rounded to bf16 at quantization time, so only the activation cast loses precision).
- For large M an fp32 GEMM on the dequantized weight is faster than any of them, so
  `mm_dequant_fp32` dequantizes (in row chunks that stay in cache) and runs fp32 GEMMs.

Layouts:
- `Int8Weight`: int8 (N, K) + scales (N,), the same on every device.
- `Int4Weight`: on CPU, `_convert_weight_to_int4pack_for_cpu`'s layout, which depends on the
  CPU torch runs on (torch 2.13: row blocks of 32 under AVX2, of 64 with another tail order under
  AVX-512), so it is opaque here: the canonical nibbles are kept beside it for dequantize and
  export (twice the code bytes; this is the fallback used only without qwenkit's C kernels).
  On CUDA, `_convert_weight_to_int4pack`'s opaque int32 tiling plus a canonical copy is not
  kept: the CUDA int4 module is built once from the canonical form and never dequantized.
  Scales and zeros are one (G, N, 2) tensor in the activation dtype, as the kernels want.
- `BlockInt4Weight`: qwenkit's own CPU layout for `csrc/qgemm_avx2.c`: codes (N, K/2) uint8,
  per 64 columns 32 bytes with byte j = code(j) | code(j + 32) << 4 (one 256-bit load unpacks
  two blocks of 32 in column order); scales and zeros bf16 (N, G), rows = output channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit.cpu import cgemv
from qwenkit.quant.numerics import unpack_int4

# Rows of weight dequantized at once on the large-M path: 256 rows x 4864 cols x 4 B = 5 MB, so
# the fp32 chunk is still in L2/L3 when the GEMM reads it.
DEQUANT_CHUNK_BYTES = 4 * 1024 * 1024
_INT4_BLOCK_N = 32


def _chunk_rows(k: int) -> int:
    return max(64, (DEQUANT_CHUNK_BYTES // (4 * k)) // 64 * 64)


def _linear_chunked(
    x: torch.Tensor, n: int, rows: int, dequant: "callable[[int, int], torch.Tensor]"
) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W.T, W dequantized `rows` rows at a time by dequant(lo, hi)."""
    if rows >= n:
        return F.linear(x, dequant(0, n))
    out = torch.empty(n, x.shape[0], dtype=torch.float32, device=x.device)  # (N, M): row slices
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        torch.mm(dequant(lo, hi), x.t(), out=out[lo:hi])  # (rows, M)
    return out.t()  # (M, N), a transposed view; callers reshape


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 (N, K)
    scales: torch.Tensor  # fp32 (N,), exactly representable in bf16

    @classmethod
    def from_canonical(cls, qweight: torch.Tensor, scales: torch.Tensor) -> Int8Weight:
        return cls(qweight.contiguous(), scales.float().contiguous())

    def dequantize(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.qweight.shape[0] if hi is None else hi
        return self.qweight[lo:hi].float() * self.scales[lo:hi, None]

    def mm_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) fp32 -> (M, N) fp32 via the int8 weight-only kernel on bf16 activations."""
        s = self.scales.to(torch.bfloat16)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, s).float()

    def mm_dequant_fp32(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.qweight.shape
        return _linear_chunked(x, n, _chunk_rows(k), self.dequantize)


class DynamicInt8Weight:
    """fbgemm dynamic quantization (int8 weights per channel, int8 activations per tensor).

    Benchmarked only (`qwenkit bench kernels`): it needs the deprecated quantized-tensor API,
    and its 7-bit per-tensor activations are a quality risk on Qwen's activation outliers (not
    yet measured with `qwenkit eval quant`). It was the fastest large-M int8 GEMM seen here.
    """

    def __init__(self, packed: object) -> None:
        self.packed = packed

    @classmethod
    def from_canonical(cls, qweight: torch.Tensor, scales: torch.Tensor) -> DynamicInt8Weight | None:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return None
        qw = torch._make_per_channel_quantized_tensor(
            qweight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
        )
        return cls(torch.ops.quantized.linear_prepack(qw, None))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


@dataclass
class Int4Weight:
    packed: torch.Tensor  # CPU: uint8, torch's (CPU-dependent) int4pack layout
    qweight: torch.Tensor  # uint8 (N, K/2) canonical nibbles (numerics.py)
    scales_and_zeros: torch.Tensor  # bf16 (G, N, 2)
    group_size: int
    n: int
    k: int

    @classmethod
    def from_canonical(
        cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
    ) -> Int4Weight:
        """Canonical (N, K/2) nibbles + (N, G) scales/zeros -> kernel layout (CPU)."""
        n, half_k = qweight.shape
        if n % _INT4_BLOCK_N:
            raise ValueError(f"int4 CPU kernel needs out_features % 32 == 0, got {n}")
        codes = unpack_int4(qweight).to(torch.int32)  # (N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1)  # (G, N, 2)
        return cls(packed, qweight.contiguous(), sz.to(torch.bfloat16).contiguous(), group_size, n, 2 * half_k)

    # ---- layout conversion
    def codes(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """uint8 codes (hi - lo, K) of rows [lo, hi)."""
        return unpack_int4(self.qweight[lo:hi])

    def to_canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sz = self.scales_and_zeros.transpose(0, 1)  # (N, G, 2)
        return self.qweight, sz[..., 0].contiguous(), sz[..., 1].contiguous()

    def dequantize(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.n if hi is None else hi
        g = self.group_size
        q = self.codes(lo, hi).view(hi - lo, self.k // g, g).float()  # (rows, G, g)
        sz = self.scales_and_zeros[:, lo:hi].transpose(0, 1).float()  # (rows, G, 2)
        w = (q - 8.0) * sz[..., 0:1] + sz[..., 1:2]
        return w.view(hi - lo, self.k)

    # ---- matmuls
    def mm_bf16(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        ).float()

    def mm_dequant_fp32(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(_INT4_BLOCK_N, _chunk_rows(self.k) // _INT4_BLOCK_N * _INT4_BLOCK_N)
        return _linear_chunked(x, self.n, rows, self.dequantize)


@dataclass
class BlockInt4Weight:
    codes: torch.Tensor  # uint8 (N, K/2), `cgemv.pack_q4` layout
    scales: torch.Tensor  # bf16 (N, G)
    zeros: torch.Tensor  # bf16 (N, G)
    group_size: int

    @classmethod
    def from_canonical(
        cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
    ) -> BlockInt4Weight:
        codes = cgemv.pack_q4(unpack_int4(qweight))
        return cls(codes, scales.to(torch.bfloat16).contiguous(), zeros.to(torch.bfloat16).contiguous(), group_size)

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return 2 * self.codes.shape[1]

    def to_canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = cgemv.unpack_q4(self.codes)
        return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), self.scales.float(), self.zeros.float()

    def dequantize(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.n if hi is None else hi
        g = self.group_size
        q = cgemv.unpack_q4(self.codes[lo:hi]).view(hi - lo, self.k // g, g).float()
        w = (q - 8.0) * self.scales[lo:hi, :, None].float() + self.zeros[lo:hi, :, None].float()
        return w.view(hi - lo, self.k)

    def mm_q(self, x: torch.Tensor) -> torch.Tensor:
        """int8-activation AVX2 kernel (small M)."""
        return cgemv.gemm_q4(x, self.codes, self.scales, self.zeros, self.group_size)

    def mm_dequant_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_chunked(x, self.n, _chunk_rows(self.k), self.dequantize)
