"""Attention for packed training rows: causal within a document, never across documents.

`DocumentAttention(document_ids)` is an `AttentionBackend` (see `qwenkit.model.attention`): the
model calls it like the engine's caches, so training runs the same forward pass as inference.
On the CPU it hands SDPA one boolean (B, 1, T, T) block-diagonal causal mask; rows holding one
unpadded document take SDPA's plain causal path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenkit.model.attention import causal_attention


class DocumentAttention:
    def __init__(self, document_ids: torch.Tensor) -> None:
        """document_ids: (B, T) document index of each token, -1 for padding."""
        doc = document_ids
        self.single_document = bool((doc == 0).all())
        self.mask: torch.Tensor | None = None
        if not self.single_document:
            t = doc.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
            # padding (-1) attends to padding: every query row keeps a visible key (no NaN)
            same = doc[:, :, None] == doc[:, None, :]
            self.mask = (same & causal)[:, None]  # (B, 1, T, T)
        self._windowed: dict[int, torch.Tensor] = {}

    def _mask_for(self, window: int | None) -> torch.Tensor | None:
        if window is None or self.mask is None:
            return self.mask
        if window not in self._windowed:
            t = self.mask.shape[-1]
            idx = torch.arange(t, device=self.mask.device)
            # inside one document token distance equals position distance
            self._windowed[window] = self.mask & ((idx[:, None] - idx[None, :]) < window)
        return self._windowed[window]

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
        """q: (B, T, Hq, D), k/v: (B, T, Hkv, D) -> (B, T, Hq, D)."""
        if self.single_document:
            return causal_attention(q, k, v, scale=scale, sliding_window=sliding_window)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kh.shape[1] != qh.shape[1]:  # GQA: SDPA's masked CPU kernels want equal heads
            rep = qh.shape[1] // kh.shape[1]
            kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self._mask_for(sliding_window), scale=scale)
        return out.transpose(1, 2)
