"""Images in engine requests (vLLM's ``{"prompt"/"prompt_token_ids", "multi_modal_data": {"image": [...]}}``).

At admission each ``<|image_pad|>`` placeholder of the prompt (one per image, in order) is
expanded to its image's t*h*w/merge^2 tokens, the pixels are preprocessed, each image is hashed
(prefix-cache key) and the prompt's M-RoPE positions and rope delta are computed. The vision
encoder runs later, in the model runner, once per image and only for an image whose tokens are
not all served by the prefix cache; the features stay here, so a preempted request that is
recomputed does not encode again.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from qwenkit.model.qwen2_5_vl import VLConfig, mrope_positions
from qwenkit.multimodal.processor import ImageProcessor


@dataclass
class MultiModalState:
    """The images of one request (shared by its `n` sequences)."""

    pixel_values: list[torch.Tensor]  # per image (t*h*w, patch_dim)
    grids: list[tuple[int, int, int]]
    ranges: list[tuple[int, int]]  # per image: its tokens' [start, end) in the prompt
    hashes: list[str]
    positions: torch.Tensor  # (3, num_prompt_tokens) M-RoPE position ids
    rope_delta: int
    features: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.features:
            self.features = [None] * len(self.grids)

    def block_keys(self, lo: int, hi: int) -> tuple[str, ...]:
        """Hashes of the images with tokens in positions [lo, hi) (vLLM's block extra keys)."""
        return tuple(h for (s, e), h in zip(self.ranges, self.hashes) if s < hi and e > lo)

    def rope_positions(self, start: int, n: int) -> torch.Tensor:
        """M-RoPE positions (3, n) of positions [start, start + n): the prompt's, then text
        positions shifted by the rope delta."""
        p = self.positions.shape[1]
        out = (torch.arange(start, start + n) + self.rope_delta).expand(3, n).clone()
        if start < p:
            k = min(p, start + n) - start
            out[:, :k] = self.positions[:, start : start + k]
        return out


def image_list(data: Mapping[str, Any], where: str) -> list[Any]:
    unknown = sorted(set(data) - {"image"})
    if unknown:
        raise ValueError(f"{where}: multi_modal_data supports 'image' only, got {unknown}")
    images = data.get("image")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def expand_images(
    ids: Sequence[int], images: Sequence[Any], vl: VLConfig, processor: ImageProcessor, where: str
) -> tuple[list[int], MultiModalState]:
    """Prompt ids with one placeholder per image -> the expanded ids and the request's image state."""
    from PIL import Image

    pad = vl.image_token_id
    slots = [i for i, t in enumerate(ids) if t == pad]
    if len(slots) != len(images):
        raise ValueError(
            f"{where}: the prompt has {len(slots)} <|image_pad|> placeholder(s) (token {pad}) but "
            f"{len(images)} image(s) were given; put <|vision_start|><|image_pad|><|vision_end|> once per image"
        )
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"{where}: multi_modal_data.image[{i}] must be a PIL.Image.Image, got {type(im).__name__}")
    try:
        processed = processor(images)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    pixels = processed.split()
    out: list[int] = []
    ranges: list[tuple[int, int]] = []
    prev = 0
    for slot, grid in zip(slots, processed.image_grid_thw):
        out.extend(ids[prev:slot])
        n = vl.num_image_tokens(grid)
        ranges.append((len(out), len(out) + n))
        out.extend([pad] * n)
        prev = slot + 1
    out.extend(ids[prev:])
    hashes = []
    for px, grid in zip(pixels, processed.image_grid_thw):
        h = hashlib.blake2b(px.numpy().tobytes(), digest_size=16)
        h.update(repr(grid).encode())
        hashes.append(h.hexdigest())
    positions, delta = mrope_positions(out, processed.image_grid_thw, pad, vl.vision.spatial_merge_size)
    state = MultiModalState(pixels, list(processed.image_grid_thw), ranges, hashes, positions, delta)
    return out, state
