"""Write a tiny random qwen2 GGUF (weights only, no tokenizer) with gguf.GGUFWriter."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def write_tiny_gguf(
    path: Path, model: torch.nn.Module, qtype_name: str = "Q8_0", metadata: Callable[[Any], None] | None = None
) -> dict[str, np.ndarray]:
    """Write `model` (ours, HF-named via hf_state_dict) as GGUF; 2-D weights in `qtype_name`;
    `metadata(writer)` adds more keys.

    Returns the reference fp32 weights (HF names) as gguf.quants.dequantize reproduces them.
    """
    import gguf

    from qwenkit.loaders.gguf import hf_to_gguf_name

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if metadata is not None:
        metadata(w)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    ref: dict[str, np.ndarray] = {}
    for name, t in model.hf_state_dict():
        arr = t.detach().float().numpy()
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(hf_to_gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
            ref[name] = gguf.quants.dequantize(q, qtype)
        else:
            w.add_tensor(hf_to_gguf_name(name), arr)
            ref[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref
