"""A tiny random Qwen2.5-VL HF folder (transformers' `save_pretrained` + the tiny tokenizer).

`make_tiny_vl(path) -> path`: 2 vision blocks (block 1 full attention, block 0 windowed with
window_size 56 = 2x2 merged patches, so images of more than 2x2 merged tokens really split into
windows), 2 language layers, the tiny tokenizer's vocabulary (576) with the vision token ids
remapped to its control tokens, and a preprocessor_config.json with a small max_pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The tiny tokenizer's control ids (tests/tiny_tokenizer.py: 512 + the offset in CONTROL_TOKENS).
ENDOFTEXT, IM_END = 512, 514
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 521, 522, 524, 525
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 48

# Qwen2-VL / Qwen2.5-VL's chat template (as the hub checkpoints ship it in chat_template.json)
VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vl_hf_config(**text_overrides: Any) -> dict[str, Any]:
    text = {
        "vocab_size": 576, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": ENDOFTEXT, "eos_token_id": IM_END,
    }  # fmt: skip
    text.update(text_overrides)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        "tie_word_embeddings": False,
        "image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "hidden_act": "silu",
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1], "out_hidden_size": 64, "in_chans": 3, "tokens_per_second": 2,
        },
    }  # fmt: skip


def make_tiny_vl_reference(seed: int = 0) -> Any:
    """The random transformers model (fp32, eval, sdpa), biases and norms perturbed so a bias or
    norm bug shows."""
    import torch
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(**tiny_vl_hf_config())
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    ref = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def make_tiny_vl(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny VL model folder to `path` (config, safetensors, tokenizer, preprocessor)."""
    from tests.tiny_tokenizer import write_tiny_tokenizer

    out = Path(path)
    make_tiny_vl_reference(seed).save_pretrained(out)
    write_tiny_tokenizer(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = VL_CHAT_TEMPLATE  # the hub checkpoints carry it here and in chat_template.json
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": VL_CHAT_TEMPLATE}))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))  # fmt: skip
    gen = {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out
