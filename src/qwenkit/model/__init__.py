"""The Qwen2 model family as plain nn.Modules (no engine knowledge)."""
from __future__ import annotations

from qwenkit.model.attention import AttentionBackend, ContiguousKVCache, attend
from qwenkit.model.qwen2 import Qwen2ForCausalLM

__all__ = ["AttentionBackend", "ContiguousKVCache", "Qwen2ForCausalLM", "attend"]
