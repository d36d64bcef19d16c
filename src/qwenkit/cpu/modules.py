"""The model's layers with the fused C ops (`ops`): subclasses that add no state and override
only the small methods the plain modules expose for this, falling back to the parent's torch
expression whenever `ops.enabled` says no (autograd, CUDA, another dtype, `torch.compile`, no
compiler). `qwenkit.cpu.install` swaps them in."""
from __future__ import annotations

import torch

from qwenkit.cpu import ops
from qwenkit.model.layers import RMSNorm, SwiGLU
from qwenkit.model.qwen2 import Qwen2Attention


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.enabled(x, self.weight):  # one pass, HF's formula and rounding
            return ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedSwiGLU(SwiGLU):
    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if ops.enabled(gate_up):
            return ops.silu_and_mul(gate_up)
        return super().act_and_mul(gate_up)


class FusedQwen2Attention(Qwen2Attention):
    def rotate_qk(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = qkv.shape
        heads = self.num_heads + self.num_kv_heads
        if ops.enabled(qkv, *rope) and ops.rope_(qkv, *rope, heads, self.head_dim):
            # q and k rotated in place inside qkv (same rounding as `rotate`)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return (
                q.view(b, t, self.num_heads, self.head_dim),
                k.view(b, t, self.num_kv_heads, self.head_dim),
                v.view(b, t, self.num_kv_heads, self.head_dim),
            )
        return super().rotate_qk(qkv, rope)
