"""Load an image from a PIL image, a path, a ``data:`` URL or an ``http(s)://`` URL, safely.

Every failure is an :class:`~qwenkit.errors.ImageInputError` saying what was wrong. Limits:

* ``max_bytes``: encoded size; remote bodies are cut off while streaming, data URLs are checked
  from their base64 length before decoding.
* ``max_pixels``: width x height read from the header (PIL opens lazily) before any pixel is
  decoded, so a decompression bomb is refused without allocating it.
* ``timeout``: seconds for the whole remote fetch (vLLM's ``VLLM_IMAGE_FETCH_TIMEOUT``).
* ``allowed_local_media_path``: local files (plain paths, ``file://``). ``True`` allows any path
  (library use), ``False`` refuses all (the server's default), a directory allows files under it
  (vLLM's ``--allowed-local-media-path``).
* ``allowed_media_domains``: when given, http(s) URLs (and their redirects) must be on one of
  these hosts (vLLM's ``--allowed-media-domains``).
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from qwenkit.errors import ImageInputError

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageSource",
    "LocalPolicy",
    "decode_image",
    "load_image",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # OpenAI's per-image limit
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # below PIL's own bomb limit (~179 M), so ours speaks first
DEFAULT_FETCH_TIMEOUT = 5.0  # vLLM's VLLM_IMAGE_FETCH_TIMEOUT default
_CHUNK = 64 * 1024

ImageSource = Union[str, os.PathLike, Image.Image]
LocalPolicy = Union[bool, str, os.PathLike]


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    allowed_local_media_path: LocalPolicy = True,
    allowed_media_domains: Sequence[str] | None = None,
) -> Image.Image:
    """The image at ``source`` as a decoded RGB :class:`PIL.Image.Image` (see the module doc)."""
    if max_bytes <= 0 or max_pixels <= 0 or timeout <= 0:
        raise ValueError("max_bytes, max_pixels and timeout must be > 0")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return _to_rgb(source)
    if isinstance(source, os.PathLike):
        data = _read_local(Path(source), max_bytes, allowed_local_media_path)
    elif isinstance(source, str):
        scheme = source.split(":", 1)[0].lower() if ":" in source[:12] else ""
        if scheme == "data":
            data = _decode_data_url(source, max_bytes)
        elif scheme in ("http", "https"):
            data = _fetch(source, max_bytes, timeout, allowed_media_domains)
        elif scheme == "file":
            parsed = urllib.parse.urlparse(source)
            if parsed.netloc not in ("", "localhost"):
                raise ImageInputError(f"file:// URL with a host is not supported: {_short(source)}")
            data = _read_local(Path(urllib.parse.unquote(parsed.path)), max_bytes, allowed_local_media_path)
        elif scheme and len(scheme) > 1:  # a drive letter ("C:") is a path, not a scheme
            raise ImageInputError(
                f"unsupported image URL scheme {scheme!r}: use data:image/...;base64, http(s):// or a file path"
            )
        else:
            data = _read_local(Path(source), max_bytes, allowed_local_media_path)
    else:
        raise ImageInputError(
            f"an image must be a PIL image, a path or a URL string, got {type(source).__name__}"
        )
    return decode_image(data, max_pixels=max_pixels)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded image bytes -> RGB image (EXIF orientation applied); the size is checked from the
    header before decoding."""
    if not data:
        raise ImageInputError("the image data is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        fmt = _signature(data)
        if fmt:
            raise ImageInputError(f"the {fmt} image is truncated or its header is corrupt") from None
        raise ImageInputError(
            f"the data is not an image in a format PIL can read (starts with {data[:16]!r})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"the image has too many pixels (limit max_pixels={max_pixels}): {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"the image header is corrupt: {e}") from None
    _check_pixels(img.size, max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"the {img.format or ''} image is truncated or corrupt: {e}".replace("  ", " ")) from None
    img = ImageOps.exif_transpose(img)  # camera photos upright, as transformers' load_image
    return _to_rgb(img)


_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"the image has no pixels ({w} x {h})")
    if w * h > max_pixels:
        raise ImageInputError(
            f"the image is {w} x {h} = {w * h} pixels, more than the limit max_pixels={max_pixels}"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent areas composited on white (as a viewer shows them)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageInputError("the data URL has no ',' between its header and its data")
    params = header[5:].split(";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageInputError(f"the data URL's media type is {media_type!r}, not image/*")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageInputError("the data URL must be base64-encoded (data:image/...;base64,...)")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise ImageInputError(f"the data URL holds about {len(payload) * 3 // 4} bytes, more than max_bytes={max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"the data URL's base64 data is invalid: {e}") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"the data URL holds {len(data)} bytes, more than max_bytes={max_bytes}")
    return data


def _read_local(path: Path, max_bytes: int, allowed: LocalPolicy) -> bytes:
    if allowed is False:
        raise ImageInputError(
            "local image paths are not allowed here (start the server with --allowed-local-media-path DIR)"
        )
    try:
        resolved = path.expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageInputError(f"image file not found: {path}") from None
    if allowed is not True:
        root = Path(allowed).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise ImageInputError(f"image file {path} is outside the allowed local media path {root}")
    if not resolved.is_file():
        raise ImageInputError(f"image path is not a file: {path}")
    size = resolved.stat().st_size
    if size > max_bytes:
        raise ImageInputError(f"image file {path} has {size} bytes, more than max_bytes={max_bytes}")
    try:
        return resolved.read_bytes()
    except OSError as e:
        raise ImageInputError(f"cannot read image file {path}: {e}") from None


def _check_domain(url: str, domains: Sequence[str] | None) -> None:
    if domains is None:
        return
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    if host not in {d.lower() for d in domains}:
        raise ImageInputError(f"image URL host {host!r} is not in the allowed media domains ({', '.join(domains)})")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib's default also follows ftp://), on allowed hosts."""

    def __init__(self, domains: Sequence[str] | None) -> None:
        self.domains = domains

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise ImageInputError(f"{_short(req.full_url)} redirects to a non-http(s) URL: {_short(newurl)}")
        _check_domain(newurl, self.domains)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(domains: Sequence[str] | None) -> urllib.request.OpenerDirector:
    """Only HTTP(S): no file://, ftp:// or data: handlers behind a remote URL."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _CheckedRedirects(domains),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, max_bytes: int, timeout: float, domains: Sequence[str] | None = None) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all, reading at most ``max_bytes``."""
    _check_domain(url, domains)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "qwenkit", "Accept": "image/*"})
    try:
        with _opener(domains).open(request, timeout=timeout) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype in ("application/octet-stream", "binary/octet-stream")):
                raise ImageInputError(f"{_short(url)} answered with Content-Type {ctype!r}, not an image")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageInputError(f"{_short(url)} is {length} bytes, more than max_bytes={max_bytes}")
            chunks: list[bytes] = []
            total = 0
            while True:
                if time.monotonic() > deadline:
                    raise ImageInputError(f"fetching {_short(url)} took longer than the timeout of {timeout:g} s")
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageInputError(f"{_short(url)} sent more than max_bytes={max_bytes} bytes")
                chunks.append(chunk)
    except ImageInputError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageInputError(f"fetching {_short(url)} failed: HTTP {e.code} {e.reason}") from None
    except (TimeoutError, OSError, urllib.error.URLError, ValueError) as e:
        reason: Any = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
            raise ImageInputError(f"fetching {_short(url)} took longer than the timeout of {timeout:g} s") from None
        raise ImageInputError(f"cannot fetch {_short(url)}: {reason}") from None
    return b"".join(chunks)
