"""OpenAI chat messages with content parts -> chat-template messages + the images, in order.

Accepted parts (OpenAI's, vLLM's and the Responses API's names):
``{"type": "text", "text": ...}``, ``{"type": "input_text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` (or ``"image_url": "..."``),
``{"type": "input_image", "image_url": "..."}``, ``{"type": "image", "image": <url|path|PIL>}``,
``{"type": "image_pil", "image_pil": <PIL image>}``. A part without ``type`` is typed by its key.

Two content formats, as vLLM's ``--chat-template-content-format``:

* ``"openai"`` (templates that loop over ``message['content']``, e.g. Qwen2.5-VL's): content stays
  a list; each image becomes ``{"type": "image"}``, which the template renders as
  ``<|vision_start|><|image_pad|><|vision_end|>`` at its place.
* ``"string"`` (text templates such as Qwen2.5's): text parts are joined with newlines; images
  are still collected (the caller refuses them when the model is text-only).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.nodes

from qwenkit.errors import ImageInputError, QwenkitError
from qwenkit.multimodal.image import (
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    LocalPolicy,
    load_image,
)

__all__ = [
    "ChatImage",
    "ContentFormat",
    "ContentPartError",
    "detect_content_format",
    "load_chat_images",
    "parse_chat_messages",
]

ContentFormat = Literal["string", "openai"]
_TEXT_TYPES = ("text", "input_text")
_IMAGE_KEYS = {"image_url": "image_url", "input_image": "image_url", "image": "image", "image_pil": "image_pil"}
_UNSUPPORTED = ("video", "video_url", "input_audio", "audio", "audio_url", "image_embeds", "input_file", "file")


class ContentPartError(QwenkitError, ValueError):
    """A message's content part is malformed or of a kind this model cannot take; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ChatImage:
    """One image of a conversation: its source (URL, path or PIL image) and where it was given."""

    source: Any
    param: str  # e.g. "messages[0].content[1].image_url.url"


def parse_chat_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    content_format: ContentFormat = "openai",
    max_images: int | None = None,
) -> tuple[list[dict[str, Any]], list[ChatImage]]:
    """Split ``messages`` into the messages the chat template renders and their images, in order.

    Other message keys (``tool_calls``, ``name``, ...) pass through unchanged. ``max_images``
    bounds the images per prompt (vLLM's ``--limit-mm-per-prompt``)."""
    if content_format not in ("string", "openai"):
        raise ValueError(f"content_format must be 'string' or 'openai', got {content_format!r}")
    out: list[dict[str, Any]] = []
    images: list[ChatImage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ContentPartError(f"a message must be an object, got {type(message).__name__}", f"messages[{i}]")
        m = dict(message)
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append(m)
            continue
        if not isinstance(content, Sequence):
            raise ContentPartError("content must be a string or a list of parts", f"messages[{i}].content")
        parts: list[dict[str, Any]] = []
        texts: list[str] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind, value, param = _classify(part, where)
            if kind == "text":
                parts.append({"type": "text", "text": value})
                texts.append(value)
            else:
                images.append(ChatImage(value, param))
                if max_images is not None and len(images) > max_images:
                    raise ContentPartError(
                        f"too many images: at most {max_images} per prompt (--limit-mm-per-prompt)", where
                    )
                parts.append({"type": "image"})
        m["content"] = parts if content_format == "openai" else "\n".join(texts)
        out.append(m)
    return out, images


def _classify(part: Any, where: str) -> tuple[str, Any, str]:
    """(kind "text" | "image", text or image source, the source's param)."""
    if isinstance(part, str):
        return "text", part, where
    if not isinstance(part, Mapping):
        raise ContentPartError(f"a content part must be an object, got {type(part).__name__}", where)
    kind = part.get("type")
    if kind is None:  # Qwen / vLLM offline style: {"image": ...} or {"text": ...}
        kind = next((k for k in ("text", "image_url", "image", "image_pil") if k in part), None)
        if kind is None:
            raise ContentPartError("a content part needs a 'type'", where)
    if not isinstance(kind, str):
        raise ContentPartError("'type' must be a string", f"{where}.type")
    if kind in _TEXT_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise ContentPartError(f"a {kind} part needs a string 'text'", f"{where}.text")
        return "text", text, where
    key = _IMAGE_KEYS.get(kind)
    if key is not None:
        value = part.get(key)
        param = f"{where}.{key}"
        if key == "image_url" and isinstance(value, Mapping):
            detail = value.get("detail")
            if detail is not None and detail not in ("auto", "low", "high"):
                raise ContentPartError("detail must be 'auto', 'low' or 'high'", f"{param}.detail")
            value, param = value.get("url"), f"{param}.url"
            if not isinstance(value, str) or not value:
                raise ContentPartError("an image_url part needs a non-empty 'url' string", param)
        if value is None or (isinstance(value, str) and not value):
            raise ContentPartError(f"a {kind} part needs '{key}'", param)
        return "image", value, param
    if kind in _UNSUPPORTED:
        raise ContentPartError(f"content parts of type {kind!r} are not supported (only text and images)", f"{where}.type")
    raise ContentPartError(f"unknown content part type {kind!r}", f"{where}.type")


def load_chat_images(
    images: Sequence[ChatImage],
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    allowed_local_media_path: LocalPolicy = True,
    allowed_media_domains: Sequence[str] | None = None,
) -> list[Any]:
    """Load each image (see :func:`~qwenkit.multimodal.image.load_image`); a failure raises
    :class:`ImageInputError` whose message and ``param`` name the part."""
    out = []
    for image in images:
        try:
            out.append(
                load_image(image.source, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout,
                           allowed_local_media_path=allowed_local_media_path,
                           allowed_media_domains=allowed_media_domains)
            )  # fmt: skip
        except ImageInputError as e:
            raise ImageInputError(f"{image.param}: {e}", param=image.param) from None
    return out


def detect_content_format(template_source: str) -> ContentFormat:
    """``"openai"`` when the chat template loops over a message's content (vLLM's detection)."""
    return _detect(template_source)


@lru_cache(maxsize=16)
def _detect(source: str) -> ContentFormat:
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    for loop in tree.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Filter):  # e.g. message['content'] | list
            it = it.node
        if isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) and it.arg.value == "content":
            return "openai"
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return "openai"
    return "string"
