"""Qwen2.5-VL (HF ``model_type: qwen2_5_vl``): the Qwen2 decoder + the vision encoder + M-RoPE.

The language model is `qwen2.py`'s, unchanged: image tokens get the vision features as their
embeddings, and the rotary positions are 3-D (temporal, height, width). M-RoPE splits the
rotary frequency pairs into `mrope_section` parts (t, h, w), each rotated by its own position
component. For a text token all three components are equal, so M-RoPE there is plain RoPE at
that position: decode steps and text-only prompts run the plain (fused) path at
``position + rope_delta`` (`rope_delta` = how far the image grids pulled the positions back).

Weights load under both names: the hub checkpoints' (``visual.*``, ``model.layers.*``,
``model.embed_tokens``, ``lm_head``) and transformers 5.x ``save_pretrained``'s
(``model.visual.*``, ``model.language_model.*``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from qwenkit.config import ConfigError, ModelConfig
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.qwen2 import Qwen2ForCausalLM
from qwenkit.model.vision import VisionConfig, VisionTransformer


@dataclass(frozen=True)
class VLConfig:
    vision: VisionConfig
    mrope_section: tuple[int, ...]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> VLConfig:
        mm = config.multimodal
        if mm is None:
            raise ConfigError(f"Qwen2_5_VLForConditionalGeneration needs a qwen2_5_vl config, got {config.model_type!r}")
        section = tuple(int(s) for s in mm["mrope_section"])
        if sum(section) != config.head_dim // 2 or len(section) != 3:
            raise ConfigError(
                f"rope_scaling.mrope_section {list(section)} must be 3 parts summing to head_dim / 2 = {config.head_dim // 2}"
            )
        for key in ("image_token_id", "vision_start_token_id"):
            if not 0 <= int(mm[key]) < config.vocab_size:
                raise ConfigError(f"{key}={mm[key]} is outside the vocabulary (vocab_size={config.vocab_size})")
        vision = VisionConfig.from_hf(mm["vision_config"])
        if vision.out_hidden_size != config.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size={vision.out_hidden_size} != the language model's hidden_size={config.hidden_size}"
            )
        return cls(
            vision, section, int(mm["image_token_id"]), int(mm["video_token_id"]),
            int(mm["vision_start_token_id"]), int(mm["vision_end_token_id"]),
        )  # fmt: skip

    @property
    def merge_unit(self) -> int:
        return self.vision.spatial_merge_size**2

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_unit


def mrope_positions(
    token_ids: Sequence[int], image_grid_thw: Sequence[Sequence[int]], image_token_id: int, spatial_merge_size: int
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids (3, T) of one prompt and its rope delta, as transformers'
    `get_rope_index`: text tokens count up on all three rows; an image's tokens (its run of
    `image_token_id`, t*h*w/merge^2 long) sit at (start + t, start + row, start + col) of the
    merged grid, and the text after it resumes at start + max(h, w) / merge. delta = max + 1 - T."""
    ids = torch.as_tensor(list(token_ids))
    n = ids.numel()
    pos = torch.empty(3, n, dtype=torch.long)
    grids = [tuple(int(v) for v in g) for g in image_grid_thw]
    i, cur, g = 0, 0, 0
    is_image = (ids == image_token_id).tolist()
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        if g >= len(grids):
            raise ValueError(f"the prompt has more image token runs than the {len(grids)} image grid(s)")
        t, h, w = grids[g][0], grids[g][1] // spatial_merge_size, grids[g][2] // spatial_merge_size
        size = t * h * w
        if i + size > n or not all(is_image[i : i + size]):
            raise ValueError(f"image {g}: expected {size} consecutive image tokens at position {i}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pos[:, i : i + size] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur += max(h, w)
        i += size
        g += 1
    if g != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) but {g} image token run(s) in the prompt")
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` (the language model, `self.model`) plus `self.visual`."""

    def __init__(self, config: ModelConfig) -> None:
        vl = VLConfig.from_model_config(config)  # a bad multimodal config fails before any allocation
        super().__init__(config)
        self.vl = vl
        self.visual = VisionTransformer(vl.vision)
        # the position component (0 t, 1 h, 2 w) of each rotary dim; both halves alike (a plain
        # list: built on the meta device, a buffer would come back uninitialised)
        comp = [c for c, s in enumerate(vl.mrope_section) for _ in range(s)]
        self.mrope_component = comp + comp

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The language-model embeddings of each image's tokens: [(t*h*w/4, hidden)] per image."""
        feats = self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), image_grid_thw)
        sizes = [self.vl.num_image_tokens(g) for g in image_grid_thw]
        return list(feats.split(sizes))

    def mrope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, ..., T) -> cos, sin (..., T, 1, D): dim d rotated by component c(d)."""
        tables = [self.model.rotary_emb(positions[c], dtype) for c in range(3)]
        comp = torch.tensor(self.mrope_component, device=positions.device)
        index = comp.expand_as(tables[0][0])[None]
        cos = torch.stack([c for c, _ in tables]).gather(0, index).squeeze(0)
        sin = torch.stack([s for _, s in tables]).gather(0, index).squeeze(0)
        return cos, sin

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        rope_factor_index: torch.Tensor | None = None,
        *,
        mrope_positions: torch.Tensor | None = None,
        image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As `Qwen2ForCausalLM.hidden_states`, plus `mrope_positions` (3, N) / (3, B, T) (instead
        of `positions`) and `image_embeds` = (flat token indices (K,), features (K, hidden)) that
        replace those tokens' embeddings. Text-only steps (equal rows, no images) take the plain path."""
        if mrope_positions is None and image_embeds is None:
            return super().hidden_states(input_ids, positions, attn_metadata, rope_factor_index)
        if rope_factor_index is not None:
            raise ValueError("per-request RoPE factors do not combine with M-RoPE")
        flat = input_ids.dim() == 1
        ids = input_ids.unsqueeze(0) if flat else input_ids  # (B, T)
        if mrope_positions is None:
            base = positions if positions is not None else torch.arange(ids.shape[-1], device=ids.device)
            mrope_positions = base.unsqueeze(0).expand(3, *base.shape)
        mp = mrope_positions.unsqueeze(1) if flat else mrope_positions  # (3, B, T)
        if image_embeds is None and bool((mp == mp[:1]).all()):
            h = self.model(ids, mp[0], attn_metadata)  # text only: plain RoPE at the shifted positions
            return h[0] if flat else h
        h = self.model.embed_tokens(ids)
        if image_embeds is not None:
            index, feats = image_embeds
            h = h.reshape(-1, h.shape[-1]).index_copy(0, index, feats.to(h.dtype)).view_as(h)
        h = self.model.run_layers(h, self.mrope(mp, h.dtype), attn_metadata)
        return h[0] if flat else h

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Whole-prompt scoring, as transformers' forward: input_ids (B, T) (or (T,)) with the
        image tokens already expanded; -> logits (B, T, vocab) fp32."""
        if pixel_values is None:
            return super().forward(input_ids, positions, attn_metadata)
        if positions is not None or attn_metadata is not None:
            raise ValueError("with pixel_values the positions are computed here (whole prompts only)")
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        grids = [tuple(int(v) for v in g) for g in image_grid_thw or ()]
        feats = self.encode_images(pixel_values, grids)
        rows, used = [], 0
        for b in range(ids.shape[0]):  # images are consumed in order, row by row
            need = int((ids[b] == self.vl.image_token_id).sum())
            k = used
            while k < len(grids) and sum(self.vl.num_image_tokens(g) for g in grids[used:k]) < need:
                k += 1
            pos, _ = mrope_positions(ids[b].tolist(), grids[used:k], self.vl.image_token_id, self.vl.vision.spatial_merge_size)
            rows.append(pos)
            used = k
        mp = torch.stack(rows, dim=1).to(ids.device)  # (3, B, T)
        index = (ids.reshape(-1) == self.vl.image_token_id).nonzero()[:, 0]
        h = self.hidden_states(ids, mrope_positions=mp, image_embeds=(index, torch.cat(feats)))
        logits = self.compute_logits(h)
        return logits[0] if input_ids.dim() == 1 else logits

    # ------------------------------------------------------------------ weights
    @staticmethod
    def hub_name(name: str) -> str:
        """transformers 5.x save names -> the hub checkpoints' names (our module names)."""
        if name.startswith("model.visual."):
            return name[len("model.") :]
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], adopt: bool = False) -> set[str]:
        """Either naming scheme; `hf_state_dict` (export) writes the hub names, ours."""
        return super().load_weights(((self.hub_name(n), t) for n, t in weights), adopt)

    def _load_tensor(self, name, tensor, params, modules, adopt=False):  # type: ignore[no-untyped-def]
        if not name.startswith("visual."):
            return super()._load_tensor(name, tensor, params, modules, adopt)
        param = params.get(name)  # vision tensors load 1:1 (no fused projections)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no matching parameter in the vision encoder")
        if param.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {name}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}")
        param.data.copy_(tensor)
        return name


def is_vl_model(model: nn.Module) -> bool:
    return isinstance(model, Qwen2_5_VLForConditionalGeneration)


__all__ = ["Qwen2_5_VLForConditionalGeneration", "VLConfig", "mrope_positions", "is_vl_model"]
