"""Weight-only quantized linear layers, swapped in for `nn.Linear` / `MergedLinear` after
construction (gpt-fast style: the model code never branches on quantization).

``y = x @ W.T + b`` with W stored quantized (int8 per output channel, or int4 group-wise) and
x, y, b in fp32. The kernel is picked per call by the number of rows M of x:

* ``M <= small_m`` (decode, small batches): qwenkit's AVX2 kernels (`cgemv.py`,
  `csrc/qgemm_avx2.c`) when they build: x is quantized in blocks of 32 (one fp32 scale each,
  as llama.cpp's Q8 activations; 7 bits for int8 weights, 8 for int4) and the weights stay
  int8 / int4 through `vpmaddubsw` integer dot products. int4 then uses qwenkit's block layout
  (`kernels.BlockInt4Weight`). Without a C compiler: torch's `_weight_int8pack_mm` /
  `_weight_int4pack_mm_for_cpu`, which are fast only with bf16 activations, so x is cast to
  bf16 around them and y back to fp32. Decode is bandwidth-bound on the weights.
* ``M > small_m`` (prefill): int8 runs the same int8-activation kernel (it tiles the rows in
  chunks that stay in L2 and reaches ~210-225 GOP/s here at M=512, above torch's fp32 GEMM at
  ~140-175 GFLOP/s), so prefill and decode see the same numerics. int4 (and int8 without the C
  kernels) dequantize W to fp32 a few hundred rows at a time (each chunk stays in cache) and run
  fp32 GEMMs — plain bf16 and the weight-only kernels collapse at large M. No fp32 copy of the
  weights is kept, so resident memory stays that of the quantized model.

On CUDA both formats run the dequantize-in-GEMM expression gpt-fast uses (int8) or torch's CUDA
int4 kernel, with activations in the input dtype.

Every layer has `reference_forward` (pure torch: dequantize, then fp32 matmul); tests bound the
difference between the fast path and it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant import cgemv, kernels
from qwenkit.quant.numerics import (
    dequantize_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

# Rows M of x up to which `_mm_small` runs (above: `_mm_large`). int4: its int8-activation kernel
# takes ~0.5x the time of dequantize + fp32 GEMM at M=64 (`qwenkit bench kernels`); above 64 rows
# prefill dequantizes. int8 on CPU runs its kernel in both (with the C kernels), so the limit
# only matters for the torch fallback and the fused decode step's row cap (decode_step.py).
# None = the format's own default.
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
        n, k = qweight.shape
        super().__init__(k, n, bias, **kwargs)  # type: ignore[arg-type]
        assert qweight.dtype == torch.int8 and scales.shape == (n,)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        # The kernel wants scales in the activation dtype; they are bf16-exact (numerics.py).
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs: object) -> Int8Linear:
        q, s = quantize_int8_per_channel(linear.weight.detach())
        return cls(q, s, linear.bias, **_merged_meta(linear), **kwargs)

    def _weight(self) -> kernels.Int8Weight:
        return kernels.Int8Weight(self.qweight, self.scales)

    def _mm_small(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:
            return _add_bias(F.linear(x, self.qweight.to(x.dtype)) * self.scales, bias)
        if cgemv.available():  # AVX2 (qwenkit/cpu/csrc): int8 activations, else fp32 ones
            if cgemv.supports_q(self.in_features):
                return cgemv.gemm_q8(x, self.qweight, self.scales, bias)
            return cgemv.gemm_int8(x, self.qweight, self.scales, bias)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales_bf16)
        return _add_bias(y.float(), bias)

    def _mm_large(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales
        if cgemv.available() and cgemv.supports_q(self.in_features):
            return cgemv.gemm_q8(x, self.qweight, self.scales)
        return self._weight().mm_dequant_fp32(x)

    def dequantize(self) -> torch.Tensor:
        return self._weight().dequantize()

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales.to(torch.bfloat16)}


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
        return self._weight().mm_dequant_fp32(x)

    def _mm_cuda(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype)

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
