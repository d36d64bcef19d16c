"""Weight-only quantized linear layers, swapped in for `nn.Linear` / `MergedLinear` after
construction (gpt-fast style: the model code never branches on quantization).

``y = x @ W.T + b`` with W stored quantized (int8 per output channel, or int4 group-wise) and
x, y, b in fp32. The kernel is picked per call by the number of rows M of x:

* On CPU with qwenkit's C kernels (`cgemv.py`, `csrc/qgemm_avx2.c`; AVX512-VNNI or AVX2), every
  M (decode, batched decode, prefill) runs the int8-activation kernels: x is quantized per
  block (one fp32 scale each, as llama.cpp's Q8 activations; `cgemv.act_format`) and the weights
  stay int8 / int4 through integer dot products. int8 weights are stored in the kernel's tiled
  layout (`cgemv.pack_q8`), int4 in qwenkit's block layout (`kernels.BlockInt4Weight`). Both
  run faster than torch's fp32 GEMM and than dequantize + fp32 GEMM at every M
  (docs/benchmarks.md); one kernel at every M also makes a row's result independent of the
  batch (prefill == decode numerics).
* Without the C kernels: ``M <= small_m`` runs torch's `_weight_int8pack_mm` /
  `_weight_int4pack_mm_for_cpu`, which are fast only with bf16 activations, so x is cast to
  bf16 around them and y back to fp32; larger M dequantizes W to fp32 a few hundred rows at a
  time (each chunk stays in cache) and runs fp32 GEMMs. No fp32 copy of the weights is kept, so
  resident memory stays that of the quantized model.

On CUDA both formats run the dequantize-in-GEMM expression gpt-fast uses (int8) or torch's CUDA
int4 kernel, with activations in the input dtype.

Every layer has `reference_forward` (pure torch: dequantize, then fp32 matmul); tests bound the
difference between the fast path and it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.cpu import cgemv
from qwenkit.cpu.decode_step import INT4, INT8, LinearLayout
from qwenkit.quant import kernels
from qwenkit.quant.numerics import (
    dequantize_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

# Rows M of x up to which `_mm_small` runs (above: `_mm_large`). With the C kernels both run the
# same kernel, so the limit only matters for the torch fallback and the fused decode step's row
# cap (decode_step.py). None = the format's own default.
DEFAULT_SMALL_M: int | None = None
INT8_SMALL_M = 64
INT4_SMALL_M = 64


class QuantizedLinear(nn.Module):
    """Common shape/bias/metadata handling. Quantized storage lives in buffers (never
    parameters), so `next(model.parameters())` still reports the fp32 activation dtype."""

    format: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        output_sizes: tuple[int, ...] | None = None,
        shard_names: tuple[str, ...] | None = None,
        small_m: int | None = DEFAULT_SMALL_M,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        # Fused (MergedLinear) metadata, kept for checkpoint export: rows of each HF projection.
        self.output_sizes = output_sizes or (out_features,)
        self.shard_names = shard_names
        self.small_m = self.default_small_m if small_m is None else small_m

    default_small_m = INT8_SMALL_M

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if x2.shape[0] <= self.small_m:
            y = self._mm_small(x2, self.bias)
        else:
            y = self._mm_large(x2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, small_m={self.small_m}"
        )

    # subclasses
    def _mm_small(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + bias for small M (the C kernels add the bias in their epilogue)."""
        raise NotImplementedError

    def _mm_large(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """Kernel-independent tensors (what checkpoints hold), rows = output channels."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights, one scale per output channel (symmetric)."""

    format = "int8"

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        **kwargs: object,
    ) -> None:
        """qweight: row-major int8 (N, K). On CPU with qwenkit's int8 kernel it is stored in
        that kernel's tiled layout (`cgemv.pack_q8`, `tile_rows` rows a tile), else as given."""
        n, k = qweight.shape
        super().__init__(k, n, bias, **kwargs)  # type: ignore[arg-type]
        assert qweight.dtype == torch.int8 and scales.shape == (n,)
        tiled = qweight.is_cpu and cgemv.available() and cgemv.supports_q(k)
        self.tile_rows = cgemv.q8_tile_rows() if tiled else 0
        self.register_buffer("qweight", cgemv.pack_q8(qweight, self.tile_rows) if tiled else qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # The kernel wants scales in the activation dtype; they are bf16-exact (numerics.py).
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs: object) -> Int8Linear:
        q, s = quantize_int8_per_channel(linear.weight.detach())
        return cls(q, s, linear.bias, **_merged_meta(linear), **kwargs)

    def row_major(self) -> torch.Tensor:
        """qweight as row-major int8 (N, K) (a new tensor when stored tiled)."""
        return cgemv.unpack_q8(self.qweight, self.tile_rows) if self.tile_rows else self.qweight

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        super()._apply(fn, recurse)
        if self.tile_rows and not self.qweight.is_cpu:  # moved off the CPU: the kernel stays behind
            self.qweight = cgemv.unpack_q8(self.qweight, self.tile_rows)
            self.tile_rows = 0
        return self

    def _weight(self) -> kernels.Int8Weight:
        return kernels.Int8Weight(self.row_major(), self.scales)

    def _mm_small(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _add_bias(F.linear(x, self.qweight.to(x.dtype)) * self.scales, bias)
        if cgemv.available():
            if self.tile_rows:  # qwenkit/cpu/csrc: int8 activations
                return cgemv.gemm_q8(x, self.qweight, self.scales, bias)
            # K % 32 != 0: fp32 activations, weights widened in registers
            return cgemv.gemm_int8(x, self.qweight, self.scales, bias)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.row_major(), self.scales_bf16)
        return _add_bias(y.float(), bias)

    def _mm_large(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales
        if self.tile_rows and cgemv.available():
            return cgemv.gemm_q8(x, self.qweight, self.scales)
        return self._weight().mm_dequant_fp32(x)

    def dequantize(self) -> torch.Tensor:
        return self._weight().dequantize()

    def kernel_layout(self) -> LinearLayout | None:
        """The fused decode step's view when this layer runs the tiled int8 kernel."""
        if not self.tile_rows:
            return None
        return LinearLayout(INT8, self.out_features, self.in_features, self.qweight, self.bias, self.small_m,
                            s=self.scales)  # fmt: skip

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.row_major(), "scales": self.scales.to(torch.bfloat16)}


class Int4Linear(QuantizedLinear):
    """4-bit codes, one (scale, zero) per `group_size` input columns per output channel."""

    default_small_m = INT4_SMALL_M

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        **kwargs: object,
    ) -> None:
        """Takes the canonical layout (numerics.py) and repacks it for the kernel."""
        n, half_k = qweight.shape
        super().__init__(2 * half_k, n, bias, **kwargs)  # type: ignore[arg-type]
        self.group_size = group_size
        self.format = f"int4-g{group_size}"
        if qweight.is_cuda:
            codes = qweight  # (N, K/2) uint8 is what the CUDA packer takes
            packed = torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), 8)
            sz = torch.stack((scales, zeros), -1).transpose(0, 1).to(torch.bfloat16).contiguous()
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", sz)
            self._canonical = (qweight, scales, zeros)  # CUDA layout is opaque: keep for export
        elif cgemv.available() and cgemv.supports_q(2 * half_k, group_size):
            b = kernels.BlockInt4Weight.from_canonical(qweight, scales, zeros, group_size)
            self.register_buffer("codes", b.codes)
            self.register_buffer("scales", b.scales)
            self.register_buffer("zeros", b.zeros)
        else:
            w = kernels.Int4Weight.from_canonical(qweight, scales, zeros, group_size)
            self.register_buffer("packed", w.packed)
            self.register_buffer("qweight", w.qweight)
            self.register_buffer("scales_and_zeros", w.scales_and_zeros)

    @property
    def _block_layout(self) -> bool:
        return hasattr(self, "codes")

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, **kwargs: object) -> Int4Linear:
        q, s, z = quantize_int4_groupwise(linear.weight.detach(), group_size)
        return cls(q, s, z, group_size, linear.bias, **_merged_meta(linear), **kwargs)

    def _weight(self) -> kernels.Int4Weight | kernels.BlockInt4Weight:
        if self._block_layout:
            return kernels.BlockInt4Weight(self.codes, self.scales, self.zeros, self.group_size)
        return kernels.Int4Weight(
            self.packed, self.qweight, self.scales_and_zeros, self.group_size, self.out_features, self.in_features
        )

    def _mm_small(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _add_bias(self._mm_cuda(x), bias)
        if self._block_layout:
            return cgemv.gemm_q4(x, self.codes, self.scales, self.zeros, self.group_size, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        )
        return _add_bias(y.float(), bias)

    def _mm_large(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self._mm_cuda(x)
        if self._block_layout and cgemv.available():  # faster than dequantize + fp32 GEMM at any M
            return cgemv.gemm_q4(x, self.codes, self.scales, self.zeros, self.group_size)
        return self._weight().mm_dequant_fp32(x)

    def _mm_cuda(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype)

    def kernel_layout(self) -> LinearLayout | None:
        """The fused decode step's view when this layer runs the block int4 kernel."""
        if not self._block_layout:
            return None
        return LinearLayout(INT4, self.out_features, self.in_features, self.codes, self.bias, self.small_m,
                            group_size=self.group_size, sc=self.scales, z=self.zeros)  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        if hasattr(self, "_canonical"):
            return dequantize_int4(*self._canonical)
        return self._weight().dequantize()

    def canonical_state(self) -> dict[str, torch.Tensor]:
        if hasattr(self, "_canonical"):
            q, s, z = self._canonical
        else:
            q, s, z = self._weight().to_canonical()
        return {"qweight": q, "scales": s.to(torch.bfloat16), "zeros": z.to(torch.bfloat16)}


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _merged_meta(linear: nn.Linear) -> dict[str, object]:
    sizes = getattr(linear, "output_sizes", None)
    names = getattr(linear, "shard_names", None)
    return {"output_sizes": tuple(sizes), "shard_names": tuple(names)} if sizes else {}
