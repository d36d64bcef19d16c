"""Image inputs of the chat API: content parts -> template messages, images loaded with the
server's limits (in the worker thread that plans the request), failures -> 400 naming the part.

Flags mirror vLLM's: ``--limit-mm-per-prompt '{"image": N}'``, ``--allowed-local-media-path``,
and the fetch timeout of ``VLLM_IMAGE_FETCH_TIMEOUT`` as ``--image-fetch-timeout``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenkit.errors import ImageInputError
from qwenkit.multimodal.chat import (
    ChatImage,
    ContentPartError,
    detect_content_format,
    load_chat_images,
    parse_chat_messages,
)
from qwenkit.multimodal.image import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from qwenkit.serve.errors import bad_request

DEFAULT_LIMIT_IMAGES = 8


@dataclass(frozen=True)
class MediaSettings:
    """Limits on image inputs. `allowed_local_media_path`: None refuses local paths;
    `allowed_media_domains`: None allows any host for http(s) images."""

    limit_images: int = DEFAULT_LIMIT_IMAGES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.limit_images < 0:
            raise ValueError(f"limit_images must be >= 0, got {self.limit_images}")
        for name in ("fetch_timeout", "max_bytes", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ValueError(f"allowed_local_media_path is not a directory: {self.allowed_local_media_path}")


def _limit_mm(value: str) -> int:
    """vLLM's JSON form '{"image": 4}' (or a plain count)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected JSON such as '{{\"image\": 4}}', got {value!r}") from None
    if isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = {"image": parsed}
    if not isinstance(parsed, dict) or set(parsed) - {"image"} or not isinstance(parsed.get("image", 0), int):
        raise argparse.ArgumentTypeError(f"only images are supported: expected '{{\"image\": N}}', got {value!r}")
    return int(parsed.get("image", DEFAULT_LIMIT_IMAGES))


def add_media_args(parser: Any) -> None:
    g = parser.add_argument_group("image inputs (vision models)")
    g.add_argument("--limit-mm-per-prompt", type=_limit_mm, default=DEFAULT_LIMIT_IMAGES, metavar="JSON",
                   help=f"most images per request, as vLLM: '{{\"image\": N}}' (default {DEFAULT_LIMIT_IMAGES})")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name local image files (paths, file://) under DIR (default: refused)")
    g.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="only fetch http(s) images (and their redirects) from these hosts (default: any)")
    g.add_argument("--image-fetch-timeout", type=float,
                   default=float(os.environ.get("QWENKIT_IMAGE_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT)),
                   help="seconds to fetch one http(s) image (default: $QWENKIT_IMAGE_FETCH_TIMEOUT or "
                        f"{DEFAULT_FETCH_TIMEOUT:g})")  # fmt: skip
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="largest encoded image")
    g.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="largest width x height, checked from the header before decoding")


def media_settings_from_args(args: argparse.Namespace) -> MediaSettings:
    return MediaSettings(
        limit_images=args.limit_mm_per_prompt, fetch_timeout=args.image_fetch_timeout,
        max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
    )  # fmt: skip


def split_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]], media: MediaSettings) -> tuple[list[dict[str, Any]], list[ChatImage]]:
    """Template messages in the format the model's chat template reads, and the image parts."""
    fmt = detect_content_format(getattr(tokenizer, "chat_template", None) or "")
    try:
        return parse_chat_messages(messages, content_format=fmt, max_images=media.limit_images)
    except ContentPartError as e:
        raise bad_request(str(e), param=e.param) from None


def load_images(engine: Any, model_name: str, images: Sequence[ChatImage], media: MediaSettings) -> list[Any]:
    """Decoded RGB images; 400 when the model is text-only or an image cannot be used. Blocking."""
    if not images:
        return []
    if not getattr(engine, "supports_images", False):
        raise bad_request(f"the model '{model_name}' does not accept images (it is a text-only model)",
                          param=images[0].param, code="images_not_supported")  # fmt: skip
    try:
        return load_chat_images(
            images, max_bytes=media.max_bytes, max_pixels=media.max_pixels, timeout=media.fetch_timeout,
            allowed_local_media_path=media.allowed_local_media_path or False,
            allowed_media_domains=media.allowed_media_domains,
        )  # fmt: skip
    except ImageInputError as e:
        raise bad_request(str(e), param=e.param, code="invalid_image") from None
