"""Tiny random Qwen2 configs shared by unit tests (HF config dicts)."""
from __future__ import annotations

from typing import Any


def tiny_hf_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 4,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def make_hf_and_ours(seed: int = 0, **overrides: Any):
    """A random transformers Qwen2ForCausalLM and our model holding the same weights (fp32)."""
    import torch
    import transformers

    from qwenkit.config import ModelConfig
    from qwenkit.model import Qwen2ForCausalLM

    hf_cfg = tiny_hf_config(**overrides)
    torch.manual_seed(seed)
    ref = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**hf_cfg, attn_implementation="eager")
    ).eval()
    # Random biases: HF initialises q/k/v biases to zero, which would hide a bias bug.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Qwen2ForCausalLM(ModelConfig.from_hf(hf_cfg)).eval()
    loaded = ours.load_weights(ref.state_dict().items())
    expected = {n for n, _ in ours.named_parameters(remove_duplicate=False)}
    assert loaded == expected, expected ^ loaded
    return ref, ours
