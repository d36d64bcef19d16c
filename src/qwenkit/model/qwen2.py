"""Qwen2 decoder (Qwen2.5 dense models) as a plain nn.Module.

Departures from HF `modeling_qwen2.py`, none of which change the math:
- q/k/v and gate/up are fused into `qkv_proj` / `gate_up_proj` (one GEMM each);
- attention goes through `qwenkit.model.attention.attend`, so the engine can swap in a paged KV
  cache without the model knowing;
- inputs may be (B, T) or a flat (N,) token stream (the engine's varlen batch, treated as B=1).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.model.attention import AttentionBackend, attend
from qwenkit.model.dca import DualChunkPositions, DualChunkRope, parse_dual_chunk_attention
from qwenkit.model.layers import (
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    default_scale,
    rotate,
)


class Qwen2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = default_scale(self.head_dim)
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            ("q_proj", "k_proj", "v_proj"),
            bias=config.attention_bias,
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden_states: torch.Tensor,
        attn_metadata: AttentionBackend | None,
    ) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)  # (B, T, q + 2 kv)
        if isinstance(rope, DualChunkPositions):
            # DCA rotates q and k per (query chunk, key chunk) relation, inside the attention
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(b, t, self.num_heads, self.head_dim)
            k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
            o = rope.attend(self.layer_idx, q, k, v.reshape(k.shape), attn_metadata, scale=self.scale)
            return self.o_proj(o.reshape(b, t, self.q_size))
        q, k, v = self.rotate_qk(qkv, rope)
        o = attend(
            self.layer_idx,
            q,
            k,
            v,
            attn_metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
        )  # (B, T, Hq, D)
        return self.o_proj(o.reshape(b, t, self.q_size))

    def rotate_qk(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (B, T, q + 2 kv) -> q (B, T, Hq, D) and k (B, T, Hkv, D) rotated, v (B, T, Hkv, D)."""
        b, t, _ = qkv.shape
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads side by side: one rotary pass for both (same math as apply_rotary)
        qk = rotate(qk.view(b, t, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
        return q, k, v.view(b, t, self.num_kv_heads, self.head_dim)


# (config, layer_idx) -> the layer's MLP, or None for the dense SwiGLU (the MoE model's hook)
MLPFactory = Callable[[ModelConfig, int], "nn.Module | None"]


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, mlp_factory: MLPFactory | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        mlp = mlp_factory(config, layer_idx) if mlp_factory is not None else None
        self.mlp = mlp if mlp is not None else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden_states: torch.Tensor,
        attn_metadata: AttentionBackend | None,
    ) -> torch.Tensor:
        h = hidden_states + self.self_attn(rope, self.input_layernorm(hidden_states), attn_metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig, mlp_factory: MLPFactory | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, i, mlp_factory) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        dca = parse_dual_chunk_attention(config.dual_chunk_attention_config)
        self.dual_chunk = DualChunkRope(config.head_dim, config.rope_theta, dca) if dca else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionBackend | None = None,
        rope_factor_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rope_factor_index` (B, T): per-token table of a per-request YaRN rotary (engine)."""
        h = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.dual_chunk is not None:
            if rope_factor_index is not None:
                raise ValueError("per-request RoPE factors cannot be combined with Dual Chunk Attention")
            return self.run_layers(h, self.dual_chunk.bind(positions), attn_metadata)  # type: ignore[arg-type]
        rope = self.rotary_emb(positions, h.dtype, rope_factor_index)  # cos, sin: (B, T, 1, D)
        return self.run_layers(h, rope, attn_metadata)

    def run_layers(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionBackend | None,
    ) -> torch.Tensor:
        """Embeddings (B, T, hidden) -> final-normed hidden states (B, T, hidden)."""
        for layer in self.layers:
            h = layer(rope, h, attn_metadata)
        return self.norm(h)


class Qwen2ForCausalLM(nn.Module):
    # HF checkpoint name -> (fused module attribute, shard name)
    packed_modules_mapping: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q_proj"),
        "k_proj": ("qkv_proj", "k_proj"),
        "v_proj": ("qkv_proj", "v_proj"),
        "gate_proj": ("gate_up_proj", "gate_proj"),
        "up_proj": ("gate_up_proj", "up_proj"),
    }

    def __init__(self, config: ModelConfig, model: Qwen2Model | None = None) -> None:
        """`model`: the decoder stack when not the dense one (the MoE model passes its own)."""
        super().__init__()
        self.config = config
        self.model = model if model is not None else Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) or (N,) -> logits (B, T, vocab) or (N, vocab), fp32."""
        return self.compute_logits(self.hidden_states(input_ids, positions, attn_metadata))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        rope_factor_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        flat = input_ids.dim() == 1
        ids = input_ids.unsqueeze(0) if flat else input_ids  # (B, T)
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        elif flat:
            positions = positions.unsqueeze(0)
        if flat and rope_factor_index is not None:
            rope_factor_index = rope_factor_index.unsqueeze(0)
        h = self.model(ids, positions, attn_metadata, rope_factor_index)  # (B, T, hidden)
        return h[0] if flat else h

    def set_rope_scaling(self, rope_scaling: Mapping[str, Any] | None) -> None:
        """Replace the RoPE scaling (HF's `rope_scaling` dict; None: plain RoPE) of a built model."""
        cfg = self.config.replace(rope_scaling=dict(rope_scaling) if rope_scaling else None)
        self.model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.config = cfg

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Logits are always fp32 (sampling and log-probs need the range).
        return self.lm_head(hidden_states).float()

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], adopt: bool = False) -> set[str]:
        """Load HF-named tensors (e.g. ``model.layers.0.self_attn.q_proj.weight``).

        `adopt`: the tensors are fresh (not views of a file or of each other), so a parameter
        of the same shape, dtype and device takes the tensor itself instead of a copy (one
        tensor's memory at a time, not two, while loading).
        Returns the set of our parameter names that were written; the caller checks coverage.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for item in weights:
            key = self._load_tensor(*item, params, modules, adopt)
            del item  # not held while the stream makes the next tensor (loading peak memory)
            if key is not None:
                loaded.add(key)
        if self.config.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
            loaded.add("lm_head.weight")
        return loaded

    def _load_tensor(
        self,
        name: str,
        tensor: torch.Tensor,
        params: dict[str, nn.Parameter],
        modules: dict[str, nn.Module],
        adopt: bool = False,
    ) -> str | None:
        """Copy one checkpoint tensor into its parameter (or fused shard); returns the parameter
        name written, or None for a tensor that is skipped."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            # A tied checkpoint may still carry the head; the tie wins, as in HF.
            return None
        *path, leaf, param_name = name.split(".")
        if leaf in self.packed_modules_mapping:
            fused, shard = self.packed_modules_mapping[leaf]
            module_name = ".".join([*path, fused])
            module = modules.get(module_name)
            if not isinstance(module, MergedLinear):
                raise KeyError(f"checkpoint tensor {name!r} has no matching module")
            module.load_shard(param_name, shard, tensor)
            return f"{module_name}.{param_name}"
        param = params.get(name)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
        if param.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}"
            )
        if adopt and tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous():
            param.data = tensor
        else:
            param.data.copy_(tensor)
        return name

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors under HF checkpoint names (fused projections split back)."""
        modules = dict(self.named_modules())
        for name, param in self.named_parameters():
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            module_name, param_name = name.rsplit(".", 1)
            module = modules[module_name]
            if isinstance(module, MergedLinear):
                parent = module_name.rsplit(".", 1)[0]
                for shard, t in module.split_for_export(param_name).items():
                    yield f"{parent}.{shard}.{param_name}", t
            else:
                yield name, param.data
