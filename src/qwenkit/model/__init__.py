"""The Qwen2 model family as plain nn.Modules (no engine knowledge)."""
from __future__ import annotations

from qwenkit.config import ModelConfig
from qwenkit.model.attention import AttentionBackend, attend
from qwenkit.model.qwen2 import Qwen2ForCausalLM
from qwenkit.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from qwenkit.model.qwen2_moe import Qwen2MoeForCausalLM


def causal_lm_class(config: ModelConfig) -> type[Qwen2ForCausalLM]:
    """The model class of a config's model_type (``qwen2``, ``qwen2_moe`` or ``qwen2_5_vl``)."""
    if config.multimodal is not None:
        return Qwen2_5_VLForConditionalGeneration
    return Qwen2MoeForCausalLM if config.moe is not None else Qwen2ForCausalLM


__all__ = [
    "AttentionBackend", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen2_5_VLForConditionalGeneration",
    "attend", "causal_lm_class",
]  # fmt: skip
