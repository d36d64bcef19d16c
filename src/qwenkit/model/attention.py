"""The one attention entry point of the model, and the simple contiguous KV cache.

The model calls `attend(layer_idx, q, k, v, attn_metadata, scale=..., sliding_window=...)` and
nothing else. `attn_metadata` is opaque to the model: ``None`` means plain causal attention over
the given tokens (scoring, training); any other object implements the `AttentionBackend`
protocol and owns its KV storage (the engine's contiguous or paged cache).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F



@runtime_checkable
class AttentionBackend(Protocol):
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
        """q: (B, T, Hq, D), k/v: (B, T, Hkv, D) for the new tokens -> (B, T, Hq, D).

        The backend stores k/v for later steps and attends q over every visible key.
        """
        ...


def attend(
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_metadata: AttentionBackend | None,
    *,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    if attn_metadata is None:
        return causal_attention(q, k, v, scale=scale, sliding_window=sliding_window)
    return attn_metadata.attend(layer_idx, q, k, v, scale=scale, sliding_window=sliding_window)


def visibility_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Boolean (Tq, Tk) mask: key j visible to query i iff k_j <= q_i and q_i - k_j < window.

    HF semantics: a window of W covers W keys, the current one included.
    """
    diff = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Reference attention. q: (B, Tq, Hq, D); k/v: (B, Tk, Hkv, D); query i sits at q_offset+i."""
    tq, tk = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = qh.shape[1] != kh.shape[1]
    if sliding_window is None and q_offset == 0 and tq == tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif tq == 1 and q_offset == tk - 1 and (sliding_window is None or tk <= sliding_window):
        # one decode query that sees every key: no mask to build (and SDPA's unmasked kernel)
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    else:
        q_pos = torch.arange(q_offset, q_offset + tq, device=q.device)
        k_pos = torch.arange(tk, device=q.device)
        mask = visibility_mask(q_pos, k_pos, sliding_window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, Tq, Hq, D)
