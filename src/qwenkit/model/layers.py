"""Building blocks of the Qwen2 decoder: RMSNorm, rotary embedding, fused linears, SwiGLU.

Fused projections use vLLM's names (`qkv_proj`, `gate_up_proj`); each fused parameter knows how
to load its HF shards (`weight_loader(param, tensor, shard_id)`) and how to split itself back
(`split_for_export`), so one generic loader and exporter serve the whole model.

Everything here is plain torch. Runtimes swap in faster subclasses after construction (the CPU
kernels: `qwenkit.cpu.install`); the small methods they override (`SwiGLU.act_and_mul`,
`Qwen2Attention.rotate_qk`) exist so that the forward passes are written once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Numerics (HF): normalise in fp32, cast back to the input dtype *before* the weight.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") RoPE; cos/sin tables computed in fp32, grown on demand.

    One instance serves every layer: `forward(positions)` gathers (cos, sin) once per step.
    `rope_scaling` of type ``yarn`` / ``dynamic`` is not implemented yet and is rejected loudly.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        rope_scaling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if kind not in ("default", None):
            raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet")
        self.head_dim = head_dim
        self.theta = theta
        self.max_position = max_position
        self._cache_len = 0
        self.cos_cached: torch.Tensor | None = None
        self.sin_cached: torch.Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        # Same op order as HF: fp32 inv_freq, fp32 positions * inv_freq, cos/sin in fp32.
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        pos = torch.arange(length, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        self.cos_cached = emb.cos().to(device)
        self.sin_cached = emb.sin().to(device)
        self._cache_len = length

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) -> cos, sin of shape (..., T, 1, D) in `dtype`."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.cos_cached is None or need > self._cache_len or self.cos_cached.device != positions.device:
            self._build(max(need, min(2 * self._cache_len, self.max_position), 256), positions.device)
        cos = self.cos_cached[positions].unsqueeze(-2).to(dtype)
        sin = self.sin_cached[positions].unsqueeze(-2).to(dtype)
        return cos, sin


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (..., T, Hq, D), k: (..., T, Hkv, D), cos/sin: (..., T, 1, D)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., T, H, D), cos/sin: (..., T, 1, D) -> x rotated (rotate_half form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MergedLinear(nn.Linear):
    """A linear layer whose output rows are the concatenation of several HF projections.

    `shard_names` name the HF projections in order (e.g. ``("q_proj", "k_proj", "v_proj")``)
    and `output_sizes` their row counts.
    """

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str], bias: bool
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        assert len(output_sizes) == len(shard_names)
        self.output_sizes = tuple(output_sizes)
        self.shard_names = tuple(shard_names)

    def shard_slice(self, shard_name: str) -> slice:
        idx = self.shard_names.index(shard_name)
        start = sum(self.output_sizes[:idx])
        return slice(start, start + self.output_sizes[idx])

    def load_shard(self, param_name: str, shard_name: str, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name)
        rows = self.shard_slice(shard_name)
        target = param.data[rows]
        if target.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {shard_name}.{param_name}: expected {tuple(target.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        target.copy_(tensor)

    def split_for_export(self, param_name: str) -> dict[str, torch.Tensor]:
        param = getattr(self, param_name)
        return {name: param.data[self.shard_slice(name)] for name in self.shard_names}


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size] * 2, ("gate_proj", "up_proj"), bias=False
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(..., 2I) -> silu(gate) * up, (..., I)."""
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
