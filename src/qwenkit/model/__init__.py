"""The Qwen2 model family as plain nn.Modules (no engine knowledge)."""
from __future__ import annotations

from qwenkit.model.attention import AttentionBackend, attend
from qwenkit.model.qwen2 import Qwen2ForCausalLM

__all__ = ["AttentionBackend", "Qwen2ForCausalLM", "attend"]
