"""A preallocated contiguous KV cache for B sequences that advance in lockstep (an
`AttentionBackend`): the simple single-sequence loop's cache and the fused decode step's
simplest backend."""
from __future__ import annotations

import torch

from qwenkit.cpu import ops
from qwenkit.cpu.decode_step import DecodeKV, decode_kv_ok
from qwenkit.model.attention import causal_attention


class ContiguousKVCache:
    """A preallocated per-layer KV buffer for B sequences that all advance in lockstep.

    Call `begin(num_new_tokens)` before each forward; every layer then writes its new k/v at
    positions [length, length + num_new_tokens) and attends over [0, length + num_new_tokens).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0  # tokens stored before the current step
        self._step = 0  # tokens written by the current step
        self._decode_index: tuple[int, torch.Tensor, torch.Tensor] | None = None  # decode kernel's tables
        self._layers_k = list(self.k.unbind(0))  # per-layer pools for the fused decode step
        self._layers_v = list(self.v.unbind(0))

    def begin(self, num_new_tokens: int) -> None:
        self.length += self._step
        if self.length + num_new_tokens > self.max_length:
            raise ValueError(
                f"KV cache full: {self.length} + {num_new_tokens} tokens > max_length "
                f"{self.max_length}"
            )
        self._step = num_new_tokens

    def decode_kv(self, window: int | None) -> DecodeKV | None:
        """The fused decode step's view (`qwenkit.cpu.decode_step`): sequence b is block b of
        each layer's pool; None unless this step adds one token that sees every key."""
        end = self.length + 1
        if self._step != 1 or (window is not None and end > window) or not decode_kv_ok(self._layers_k):
            return None
        b = self.k.shape[1]
        slots = torch.arange(b) * self.max_length + self.length
        tables, ctx = self._decode_tables(end)
        return DecodeKV(self._layers_k, self._layers_v, slots, tables, ctx)

    def _decode_tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables and context lengths of a decode step ending at `end`: sequence b is
        "block" b of each layer's pool. Built once per step, shared by every layer."""
        if self._decode_index is None or self._decode_index[0] != end:
            b = self.k.shape[1]
            self._decode_index = (end, torch.arange(b).unsqueeze(1), torch.full((b,), end))
        return self._decode_index[1], self._decode_index[2]

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        start, end = self.length, self.length + k.shape[1]
        assert k.shape[1] == self._step, "call begin(num_new_tokens) before the forward"
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        if k.shape[1] == 1 and (sliding_window is None or end <= sliding_window) and ops.enabled(q, self.k):
            # decode, every key visible: the fused C kernel reads the cache in place
            tables, ctx = self._decode_tables(end)
            out = ops.decode_attention(q[:, 0], self.k[layer_idx], self.v[layer_idx], tables, ctx, scale=scale)
            if out is not None:
                return out.unsqueeze(1)  # (B, 1, Hq, D)
        return causal_attention(
            q,
            self.k[layer_idx, :, :end],
            self.v[layer_idx, :, :end],
            scale=scale,
            sliding_window=sliding_window,
            q_offset=start,
        )
