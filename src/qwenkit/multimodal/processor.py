"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' `Qwen2VLImageProcessor`
(the PIL / numpy one): RGB (transparency over white), bicubic resize to multiples of
patch_size * merge_size within [min_pixels, max_pixels] (`smart_resize`), rescale by 1/255,
normalise with the CLIP mean / std, and flatten into patch rows.

`pixel_values` rows are (C, temporal_patch, patch, patch) flattened, in merge-group order (the
merge_size x merge_size patches of each merged token contiguous), the still image repeated
temporal_patch_size times; `image_grid_thw` = (1, H / patch, W / patch) per image.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


class ImageSizeError(ValueError):
    """An image that cannot be resized for the vision encoder (aspect ratio over 200)."""


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels]
    keeping the aspect ratio (transformers' rule, Python's round-half-even included)."""
    if min(height, width) < 1:
        raise ImageSizeError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"image of {width}x{height} pixels: aspect ratio must be at most {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor  # (sum of t*h*w, C * temporal_patch * patch^2) float32
    image_grid_thw: list[tuple[int, int, int]]

    def split(self) -> list[torch.Tensor]:
        """The pixel rows of each image."""
        return list(self.pixel_values.split([t * h * w for t, h, w in self.image_grid_thw]))


@dataclass
class ImageProcessor:
    """`preprocessor_config.json`'s fields (transformers' names and defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = field(default=OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=OPENAI_CLIP_STD)

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"image processor: need 0 < min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image processor: image_mean and image_std need 3 values (RGB)")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "preprocessor_config.json") -> ImageProcessor:
        size = cfg.get("size") or {}
        d = cls()
        try:
            return cls(
                min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or d.min_pixels),
                max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or d.max_pixels),
                patch_size=int(cfg.get("patch_size", d.patch_size)),
                temporal_patch_size=int(cfg.get("temporal_patch_size", d.temporal_patch_size)),
                merge_size=int(cfg.get("merge_size", d.merge_size)),
                image_mean=tuple(float(x) for x in cfg.get("image_mean", d.image_mean)),
                image_std=tuple(float(x) for x in cfg.get("image_std", d.image_std)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> ImageProcessor:
        """From a model folder's preprocessor_config.json; the defaults when it has none."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_config(cfg, str(path))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def preprocess_one(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One PIL image -> (patch rows (t*h*w, patch_dim) float32, (t, h, w))."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = image.convert("RGB")
        _, gh, gw = self.grid_thw(image.width, image.height)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        resized = image.resize((gw * p, gh * p), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, C)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        x = x.transpose(2, 0, 1)  # (C, H, W)
        c = x.shape[0]
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
        return np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[Any]) -> ProcessedImages:
        rows, grids = [], []
        for i, image in enumerate(images):
            try:
                px, grid = self.preprocess_one(image)
            except (ImageSizeError, TypeError) as e:
                raise type(e)(f"image {i}: {e}") from None
            rows.append(px)
            grids.append(grid)
        if not rows:
            raise ValueError("no images to preprocess")
        return ProcessedImages(torch.from_numpy(np.concatenate(rows)), grids)
