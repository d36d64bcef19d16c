"""Single-sequence greedy prefill/decode on the quantized (or fp32) model: the measured fast path.

Prefill runs the whole prompt as one batch (large GEMMs) and computes logits for the last
token only. Decode feeds one token per step through a preallocated contiguous KV cache; the
only per-step allocations are the step's activations. `compile=True` wraps the one-token step
in `torch.compile` (inductor, C++ codegen with gcc); it fuses the elementwise tail of each layer
(RMSNorm, RoPE, SiLU·mul, residual adds) and removes most of the Python dispatch overhead.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qwenkit.model import ContiguousKVCache

logger = logging.getLogger(__name__)


class DecodeSession:
    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.config: Any = model.config
        self.cache: ContiguousKVCache | None = None
        self.pos = 0
        self._step = self._step_eager
        if compile:
            self._step = torch.compile(self._step_eager, dynamic=True)

    def _new_cache(self, length: int) -> ContiguousKVCache:
        cfg = self.config
        return ContiguousKVCache(
            cfg.num_hidden_layers, 1, length, cfg.num_key_value_heads, cfg.head_dim
        )

    @torch.inference_mode()
    def prefill(self, ids: list[int], max_new_tokens: int) -> int:
        """Run the prompt; returns the greedy first token."""
        self.cache = self._new_cache(len(ids) + max_new_tokens)
        self.cache.begin(len(ids))
        x = torch.tensor([ids])  # (1, T)
        h = self.model.hidden_states(x, torch.arange(len(ids))[None], self.cache)  # (1, T, H)
        logits = self.model.compute_logits(h[:, -1])  # (1, V)
        self.pos = len(ids)
        return int(logits.argmax(-1))

    def _step_eager(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden_states(token, pos, self.cache)  # (1, 1, H)
        return self.model.compute_logits(h[:, -1]).argmax(-1)  # (1,)

    @torch.inference_mode()
    def decode(self, token: int, n: int) -> list[int]:
        """Feed `token`, then greedily generate `n` tokens; returns them."""
        assert self.cache is not None, "prefill first"
        out: list[int] = []
        tok = torch.tensor([[token]])  # (1, 1)
        for _ in range(n):
            self.cache.begin(1)
            nxt = self._step(tok, torch.tensor([[self.pos]]))
            self.pos += 1
            tok = nxt.view(1, 1)
            out.append(int(nxt))
        return out
