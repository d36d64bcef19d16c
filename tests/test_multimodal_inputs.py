"""Image inputs (qwenkit.multimodal): load_image's sources, limits and errors; OpenAI content
parts -> chat-template messages, checked against Qwen2.5-VL's own chat template rendered by
transformers (the oracle) on the unconverted OpenAI messages.

Decoded pixels are compared with PIL's own decode (exact for RGB / greyscale / palette; alpha is
composited on white, checked against a numpy formula to +-1 of 255)."""
from __future__ import annotations

import base64
import contextlib
import copy
import http.server
import io
import json
import os
import resource
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwenkit.errors import ImageInputError
from qwenkit.multimodal.chat import (
    ChatImage,
    ContentPartError,
    detect_content_format,
    load_chat_images,
    parse_chat_messages,
)
from qwenkit.multimodal.image import decode_image, load_image

# Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json ("chat_template"), verbatim.
VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------- image bytes
def png_bytes(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def gradient(w: int = 23, h: int = 17) -> Image.Image:
    a = np.arange(w * h * 3, dtype=np.uint32).reshape(h, w, 3)
    return Image.fromarray(((a * 37) % 251).astype(np.uint8), "RGB")


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height (about 60 KB on disk; 1.2 GB once decoded to RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return png_bytes(gradient())


@pytest.fixture(scope="module")
def truncated_png() -> bytes:
    data = png_bytes(gradient(64, 64))
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------- local HTTP server
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes, dict[str, str]]] = {}

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(1.5)
        status, ctype, body, extra = self.routes.get(self.path, (404, "text/plain", b"no", {}))
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in extra.items():
                if v:
                    self.send_header(k, v)
            if "Content-Length" not in extra:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass


@contextlib.contextmanager
def image_http_server(png: bytes) -> Iterator[str]:
    """A local http.server (thread) with an image, an HTML page, oversized and slow answers."""
    big = os.urandom(3000)
    _Handler.routes = {
        "/ok.png": (200, "image/png", png, {}),
        "/ok-octet": (200, "application/octet-stream", png, {}),
        "/page.html": (200, "text/html; charset=utf-8", b"<html>hi</html>", {}),
        "/big-declared": (200, "image/png", big, {}),
        # no Content-Length (HTTP/1.0, body ends at close): the limit must hold while streaming
        "/big-streamed": (200, "image/png", big, {"Content-Length": ""}),
        "/slow": (200, "image/png", png, {}),
        "/moved": (302, "text/plain", b"", {"Location": "/ok.png"}),
        "/moved-to-ftp": (302, "text/plain", b"", {"Location": "ftp://127.0.0.1/secret.png"}),
        "/moved-to-other-host": (302, "text/plain", b"", {"Location": "http://localhost:1/x.png"}),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def http_base(good_png: bytes) -> Iterator[str]:
    with image_http_server(good_png) as url:
        yield url


# ---------------------------------------------------------------------------- good inputs
def test_good_png_every_source_kind(good_png: bytes, tmp_path: Path, http_base: str) -> None:
    want = np.asarray(gradient())
    path = tmp_path / "a.png"
    path.write_bytes(good_png)
    for source in (gradient(), path, str(path), f"file://{path}", data_url(good_png), f"{http_base}/ok.png",
                   f"{http_base}/ok-octet", f"{http_base}/moved"):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (23, 17), source
        assert np.array_equal(np.asarray(img), want), source


def test_jpeg_greyscale_palette_decode_like_pil() -> None:
    src = gradient(40, 30)
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    cases = {
        "jpeg": jpeg,
        "L": png_bytes(src.convert("L")),
        "P": png_bytes(src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
    }
    for name, data in cases.items():
        got = load_image(data_url(data, "image/jpeg" if name == "jpeg" else "image/png"))
        want = Image.open(io.BytesIO(data)).convert("RGB")
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), name
    # greyscale really expands to equal channels
    grey = np.asarray(load_image(data_url(cases["L"])))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_exif_orientation_applied_like_transformers() -> None:
    """A JPEG tagged "rotate 90 CW" (orientation 6) comes out upright, equal to transformers'
    load_image on the same data URL."""
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    gradient(40, 30).save(buf, "JPEG", quality=95, exif=exif)
    url = data_url(buf.getvalue(), "image/jpeg")
    got = load_image(url)
    assert got.size == (30, 40)
    assert np.array_equal(np.asarray(got), np.asarray(hf_load_image(url).convert("RGB")))


def test_alpha_and_transparent_palette_composite_on_white() -> None:
    rgb = np.asarray(gradient(16, 8)).astype(np.float64)
    alpha = np.tile(np.linspace(0, 255, 16).round(), (8, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")
    got = np.asarray(load_image(data_url(png_bytes(rgba)))).astype(np.float64)
    a = alpha[..., None] / 255.0
    want = rgb * a + 255.0 * (1 - a)
    assert np.abs(got - want).max() <= 1.0
    # palette with a transparent index: that colour becomes white, the others keep theirs
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = load_image(data_url(png_bytes(pal, transparency=0)))
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((1, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------- bad inputs
def _fails(source: Any, *needles: str, **kw: Any) -> str:
    with pytest.raises(ImageInputError) as e:
        load_image(source, **kw)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_truncated_corrupt_and_non_image(truncated_png: bytes, good_png: bytes) -> None:
    _fails(data_url(truncated_png), "PNG", "truncated")
    _fails(data_url(good_png[:30]), "PNG", "truncated")
    corrupt = bytearray(good_png)
    corrupt[60:80] = b"\x00" * 20  # inside IDAT: the zlib stream / CRC breaks
    _fails(data_url(bytes(corrupt)), "PNG")
    _fails(data_url(b"%PDF-1.4 not a picture at all"), "not an image")
    _fails(data_url(b""), "empty")
    _fails("data:image/png;base64,@@@not base64@@@", "base64")
    _fails("data:image/png," + "x" * 10, "base64-encoded")
    _fails(data_url(good_png, "text/plain"), "text/plain", "image/*")
    _fails("data:image/png;base64", "','")
    _fails("ftp://example.com/a.png", "unsupported image URL scheme 'ftp'")
    with pytest.raises(ImageInputError, match="PIL image, a path or a URL"):
        load_image(b"\x89PNG")  # type: ignore[arg-type]


def test_decompression_bomb_refused_from_the_header() -> None:
    """20,000 x 20,000: refused before decoding — the process's peak memory does not grow by the
    1.2 GB an RGB decode would take (ru_maxrss only rises, so +300 MB is a sound bound)."""
    bomb = huge_png()
    assert len(bomb) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # PIL itself refuses it at open (above twice its MAX_IMAGE_PIXELS); the message keeps its count
    _fails(data_url(bomb), "400000000 pixels", "max_pixels=67108864")
    # also above our limit but below PIL's own bomb limit, and with a raised PIL-sized limit
    _fails(data_url(huge_png(9000, 9000)), "9000 x 9000 = 81000000 pixels", "max_pixels=67108864")
    _fails(data_url(bomb), "too many pixels", max_pixels=10**9)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (after - before) * 1024 < 300e6
    # limits are configurable: a small image passes 16x16, fails 15x15
    small = png_bytes(Image.new("RGB", (16, 16)))
    assert load_image(data_url(small), max_pixels=256).size == (16, 16)
    _fails(data_url(small), "16 x 16 = 256 pixels", max_pixels=255)
    with pytest.raises(ImageInputError, match="max_pixels"):
        load_image(Image.new("RGB", (16, 16)), max_pixels=255)
    with pytest.raises(ImageInputError, match="max_pixels"):
        decode_image(small, max_pixels=100)


def test_byte_limits(good_png: bytes, tmp_path: Path, http_base: str) -> None:
    n = len(good_png)
    assert load_image(data_url(good_png), max_bytes=n).size == (23, 17)
    _fails(data_url(good_png), "max_bytes", max_bytes=n - 100)
    path = tmp_path / "a.png"
    path.write_bytes(good_png)
    _fails(path, f"has {n} bytes, more than max_bytes={n - 1}", max_bytes=n - 1)
    _fails(f"{http_base}/big-declared", "3000 bytes, more than max_bytes=1000", max_bytes=1000)
    _fails(f"{http_base}/big-streamed", "sent more than max_bytes=1000", max_bytes=1000)


def test_http_failures(http_base: str) -> None:
    _fails(f"{http_base}/missing.png", "HTTP 404")
    _fails(f"{http_base}/page.html", "Content-Type 'text/html'", "not an image")
    _fails(f"{http_base}/moved-to-ftp", "redirects to a non-http(s) URL")
    # allowed hosts (vLLM's --allowed-media-domains), redirects included
    assert load_image(f"{http_base}/ok.png", allowed_media_domains=["127.0.0.1"]).size == (23, 17)
    _fails(f"{http_base}/ok.png", "host '127.0.0.1' is not in the allowed media domains", allowed_media_domains=["example.com"])
    _fails(f"{http_base}/moved-to-other-host", "host 'localhost' is not in the allowed", allowed_media_domains=["127.0.0.1"])
    t0 = time.monotonic()
    _fails(f"{http_base}/slow", "timeout of 0.3 s", timeout=0.3)
    assert time.monotonic() - t0 < 1.4  # gave up before the server answered (1.5 s)
    # unreachable: a port nobody listens on
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _fails(f"http://127.0.0.1:{port}/a.png", "cannot fetch", timeout=2)


def test_local_path_policy(good_png: bytes, tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "in.png").write_bytes(good_png)
    outside = tmp_path / "out.png"
    outside.write_bytes(good_png)
    (allowed / "escape.png").symlink_to(outside)
    _fails(str(allowed / "in.png"), "not allowed", "--allowed-local-media-path", allowed_local_media_path=False)
    _fails(f"file://{allowed / 'in.png'}", "not allowed", allowed_local_media_path=False)
    assert load_image(str(allowed / "in.png"), allowed_local_media_path=allowed).size == (23, 17)
    assert load_image(f"file://{allowed / 'in.png'}", allowed_local_media_path=str(allowed)).size == (23, 17)
    _fails(str(outside), "outside the allowed local media path", allowed_local_media_path=allowed)
    _fails(str(allowed / "escape.png"), "outside the allowed", allowed_local_media_path=allowed)
    _fails(str(allowed / ".." / "out.png"), "outside the allowed", allowed_local_media_path=allowed)
    _fails(str(tmp_path / "nope.png"), "not found")
    _fails(str(allowed), "not a file")
    _fails("file://otherhost/x.png", "with a host")


# ---------------------------------------------------------------------------- chat content parts
def _vl_tokenizers(tiny_tokenizer_dir: Path, tmp: Path) -> tuple[Any, Any]:
    """(qwenkit Tokenizer, transformers tokenizer) of the tiny vocabulary with the VL chat template."""
    from transformers import AutoTokenizer

    from qwenkit.tokenizer import Tokenizer

    folder = tmp / "vl_tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = VL_CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return Tokenizer.from_hf_dir(folder), AutoTokenizer.from_pretrained(folder)


def _conversations(good_png: bytes) -> list[list[dict[str, Any]]]:
    url = data_url(good_png)
    return [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                      {"type": "text", "text": "What is this?"}]}],
        [{"role": "system", "content": "Be terse."},
         {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                      {"type": "image_url", "image_url": {"url": url}},
                                      {"type": "text", "text": " and "},
                                      {"type": "image", "image": "https://example.com/b.png"}]},
         {"role": "assistant", "content": "Two squares."},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        [{"role": "user", "content": "plain text only"},
         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "and?"}]}],
    ]  # fmt: skip


def test_chat_parts_render_like_the_vl_template(tiny_tokenizer_dir: Path, tmp_path: Path, good_png: bytes) -> None:
    """Our converted messages rendered by qwenkit's chat template == transformers rendering the
    original OpenAI messages with Qwen2.5-VL's template (text and token ids), for both
    add_generation_prompt values; one image-pad token per image, in order."""
    ours, ref = _vl_tokenizers(tiny_tokenizer_dir, tmp_path)
    assert detect_content_format(VL_CHAT_TEMPLATE) == "openai"
    pad_id = ours.convert_tokens_to_ids("<|image_pad|>") if hasattr(ours, "convert_tokens_to_ids") else None
    pad_id = pad_id if pad_id is not None else ref.convert_tokens_to_ids("<|image_pad|>")
    for messages in _conversations(good_png):
        template_msgs, images = parse_chat_messages(copy.deepcopy(messages))
        for agp in (True, False):
            want = ref.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=agp, tokenize=False)
            got = ours.apply_chat_template(template_msgs, add_generation_prompt=agp)
            assert got == want
            assert ours.encode(got) == ref.encode(want, add_special_tokens=False)
        assert got.count("<|vision_start|><|image_pad|><|vision_end|>") == len(images)
        assert ours.encode(got).count(pad_id) == len(images)
    # the second conversation's images in order, each named by its place in the request
    _, images = parse_chat_messages(_conversations(good_png)[1])
    assert [i.param for i in images] == [
        "messages[1].content[1].image_url.url", "messages[1].content[3].image", "messages[3].content[0].image_url.url",
    ]  # fmt: skip
    assert images[1].source == "https://example.com/b.png"


def test_string_format_and_text_template(good_png: bytes) -> None:
    from tests.tiny_tokenizer import CHAT_TEMPLATE

    assert detect_content_format(CHAT_TEMPLATE) == "string"
    msgs, images = parse_chat_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"},
                                      {"type": "input_image", "image_url": data_url(good_png)}], "name": "x"}],
        content_format="string",
    )  # fmt: skip
    assert msgs == [{"role": "user", "content": "a\nb", "name": "x"}]
    assert [i.param for i in images] == ["messages[0].content[2].image_url"]


def test_bad_parts_name_their_place(good_png: bytes) -> None:
    url = data_url(good_png)
    cases = [
        ({"type": "input_audio", "input_audio": {}}, "messages[0].content[1].type", "not supported"),
        ({"type": "hologram"}, "messages[0].content[1].type", "unknown content part type"),
        ({"type": "image_url", "image_url": {}}, "messages[0].content[1].image_url.url", "non-empty 'url'"),
        ({"type": "image_url", "image_url": {"url": url, "detail": "max"}}, "messages[0].content[1].image_url.detail", "detail"),
        ({"type": "text"}, "messages[0].content[1].text", "string 'text'"),
        ({"foo": 1}, "messages[0].content[1]", "needs a 'type'"),
    ]
    for part, param, needle in cases:
        with pytest.raises(ContentPartError) as e:
            parse_chat_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
        assert e.value.param == param and needle in str(e.value) and str(e.value).startswith(param)
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}]
    assert len(parse_chat_messages(three, max_images=3)[1]) == 3
    with pytest.raises(ContentPartError, match=r"messages\[0\]\.content\[2\]: too many images: at most 2"):
        parse_chat_messages(three, max_images=2)


def test_load_chat_images_names_the_failing_part(good_png: bytes, truncated_png: bytes) -> None:
    ok = ChatImage(data_url(good_png), "messages[0].content[0].image_url.url")
    bad = ChatImage(data_url(truncated_png), "messages[0].content[1].image_url.url")
    assert [i.size for i in load_chat_images([ok, ok])] == [(23, 17), (23, 17)]
    with pytest.raises(ImageInputError) as e:
        load_chat_images([ok, bad])
    assert e.value.param == bad.param and str(e.value).startswith(bad.param + ": ") and "truncated" in str(e.value)
