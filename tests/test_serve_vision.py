"""Image inputs over the OpenAI chat API (in-process app, scripted engines): good images reach the
engine as vLLM's multi_modal_data with one <|image_pad|> per image in the prompt; every bad input
is a 400 naming the content part, and the server answers a normal request right after; a
text-only model refuses images; completions refuse multi_modal_data."""
from __future__ import annotations

import argparse
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from qwenkit.serve.app import create_app
from qwenkit.serve.settings import ServerSettings
from qwenkit.serve.vision import MediaSettings
from tests.serve_utils import FakeEngine
from tests.test_multimodal_inputs import (
    VL_CHAT_TEMPLATE,
    data_url,
    gradient,
    huge_png,
    image_http_server,
    png_bytes,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeVisionEngine(FakeEngine):
    """FakeEngine that takes images and records the multi_modal_data of each request."""

    model_name = "fake-vl"
    supports_images = True

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, lambda ids, params, i: "A picture.")
        self.mm: list[Any] = []

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str, priority: int = 0,
                       multi_modal_data: Any = None) -> Any:  # fmt: skip
        self.mm.append(multi_modal_data)
        async for out in super().generate(prompt_token_ids, params, request_id, priority):
            yield out


def vl_tokenizer(tokenizer_dir: Path, folder: Path) -> Any:
    """The tiny tokenizer with Qwen2.5-VL's chat template, copied to `folder`."""
    from qwenkit.tokenizer import Tokenizer

    shutil.copytree(tokenizer_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = VL_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_hf_dir(folder)


@pytest.fixture(scope="module")
def vl_tok(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return vl_tokenizer(tiny_tokenizer_dir, tmp_path_factory.mktemp("vl_tok") / "tok")


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return png_bytes(gradient())


@pytest.fixture(scope="module")
def http_base(good_png: bytes) -> Iterator[str]:
    with image_http_server(good_png) as url:
        yield url


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    gradient().save(d / "local.png")
    return d


@pytest.fixture(scope="module")
def vl(vl_tok: Any) -> Iterator[tuple[Any, FakeVisionEngine]]:
    engine = FakeVisionEngine(vl_tok)
    media = MediaSettings(limit_images=3, fetch_timeout=0.5, max_bytes=100_000)
    app = create_app(ServerSettings(model="fake", structured_warmup=False, media=media), lambda: engine)
    with TestClient(app) as c:
        yield c, engine


def image_msg(*urls: str, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def post_chat(client: Any, messages: list[dict[str, Any]], **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, **body})


def test_images_reach_the_engine_in_order(vl: Any, vl_tok: Any, good_png: bytes, http_base: str) -> None:
    client, engine = vl
    other = png_bytes(Image.new("RGBA", (9, 5), (10, 200, 30, 255)))
    r = post_chat(client, image_msg(data_url(good_png), f"{http_base}/ok.png", data_url(other)))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "A picture."
    images = engine.mm[-1]["image"]
    assert [im.mode for im in images] == ["RGB"] * 3 and [im.size for im in images] == [(23, 17), (23, 17), (9, 5)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(gradient()))
    assert images[2].getpixel((0, 0)) == (10, 200, 30)
    prompt = engine.requests[-1][1]
    pad, start, end = (vl_tok.token_to_id(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert prompt.count(pad) == 3
    for i in (k for k, t in enumerate(prompt) if t == pad):
        assert prompt[i - 1] == start and prompt[i + 1] == end
    # a text-only request to the vision model sends no multi_modal_data; /tokenize counts the pads
    assert post_chat(client, [{"role": "user", "content": "hi"}]).status_code == 200
    assert engine.mm[-1] is None
    t = client.post("/tokenize", json={"messages": image_msg(data_url(good_png))})
    assert t.status_code == 200 and t.json()["tokens"].count(pad) == 1


def test_streaming_with_an_image(vl: Any, good_png: bytes) -> None:
    client, engine = vl
    r = post_chat(client, image_msg(data_url(good_png)), stream=True)
    assert r.status_code == 200 and "A picture." in "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in r.text.splitlines() if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )  # fmt: skip
    assert engine.mm[-1]["image"][0].size == (23, 17)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_bad_images_are_400_naming_the_part(vl: Any, good_png: bytes, http_base: str, media_dir: Path) -> None:
    client, engine = vl
    data = png_bytes(gradient(64, 64))
    truncated = data[: len(data) // 2]
    url = "messages[0].content[1].image_url.url"
    rng = np.random.default_rng(0)
    noise_png = png_bytes(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), "RGB"))
    assert len(noise_png) > 100_000
    cases = [
        ("truncated PNG", image_msg(data_url(truncated)), url, "truncated"),
        ("20,000 x 20,000", image_msg(data_url(huge_png())), url, "400000000 pixels"),
        ("unreachable URL", image_msg(f"http://127.0.0.1:{_closed_port()}/x.png"), url, "cannot fetch"),
        ("slow URL", image_msg(f"{http_base}/slow"), url, "timeout of 0.5 s"),
        ("HTTP 404", image_msg(f"{http_base}/missing.png"), url, "HTTP 404"),
        ("HTML page", image_msg(f"{http_base}/page.html"), url, "text/html"),
        ("too many bytes", image_msg(data_url(noise_png)), url, "max_bytes=100000"),
        ("non-image", image_msg(data_url(b"GIF? no, plain text")), url, "not an image"),
        ("local path", image_msg(str(media_dir / "local.png")), url, "--allowed-local-media-path"),
        ("second image bad", image_msg(data_url(good_png), data_url(truncated)), "messages[0].content[2].image_url.url", "truncated"),
        ("too many images", image_msg(*[data_url(good_png)] * 4), "messages[0].content[4]", "at most 3"),
        ("unsupported part", [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": ""}}]}],
         url, "non-empty"),
    ]  # fmt: skip
    for name, messages, param, needle in cases:
        n_before = len(engine.requests)
        r = post_chat(client, messages)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"] and err["message"].startswith(param), (name, err)
        assert len(engine.requests) == n_before, name  # nothing reached the engine
        ok = post_chat(client, image_msg(data_url(good_png)))
        assert ok.status_code == 200, (name, ok.text)
    # streaming requests fail the same way, as a plain HTTP 400 before any event
    r = post_chat(client, image_msg(data_url(truncated)), stream=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == url
    # an invalid detail and a non-user image are schema errors, also 400 naming the field
    bad_detail = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]
    system_image = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(good_png)}}]},
                    {"role": "user", "content": "hi"}]  # fmt: skip
    for messages in (bad_detail, system_image):
        r = post_chat(client, messages)
        assert r.status_code == 400 and (r.json()["error"]["param"] or "").startswith("messages"), r.text


def test_local_paths_and_domains_when_configured(vl_tok: Any, media_dir: Path, tmp_path: Path) -> None:
    engine = FakeVisionEngine(vl_tok)
    media = MediaSettings(allowed_local_media_path=str(media_dir), allowed_media_domains=("example.com",))
    app = create_app(ServerSettings(model="fake", structured_warmup=False, media=media), lambda: engine)
    gradient().save(tmp_path / "outside.png")
    with TestClient(app) as client:
        assert post_chat(client, image_msg(str(media_dir / "local.png"))).status_code == 200
        assert post_chat(client, image_msg(f"file://{media_dir / 'local.png'}")).status_code == 200
        r = post_chat(client, image_msg(str(tmp_path / "outside.png")))
        assert r.status_code == 400 and "outside the allowed local media path" in r.json()["error"]["message"]
        r = post_chat(client, image_msg(f"http://127.0.0.1:{_closed_port()}/x.png"))
        assert r.status_code == 400 and "not in the allowed media domains" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    assert engine.mm[0]["image"][0].size == (23, 17)


def test_text_only_model_refuses_images(tiny_tokenizer: Any, good_png: bytes) -> None:
    engine = FakeEngine(tiny_tokenizer)
    app = create_app(ServerSettings(model="fake", structured_warmup=False), lambda: engine)
    with TestClient(app) as client:
        r = post_chat(client, image_msg(data_url(good_png)))
        assert r.status_code == 400
        err = r.json()["error"]
        assert "does not accept images" in err["message"] and err["param"] == "messages[0].content[1].image_url.url"
        assert engine.requests == []
        # text parts still join with newlines for the text template, as before
        r = post_chat(client, [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
        assert r.status_code == 200
        assert "a\nb" in tiny_tokenizer.decode(engine.requests[-1][1])
        # completions take no images (as vLLM: images only through chat)
        r = client.post("/v1/completions", json={"prompt": "hi", "multi_modal_data": {"image": [data_url(good_png)]}})
        assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"]


def test_cli_flags() -> None:
    from qwenkit.serve.cli import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_serve_parser(sub)
    args = parser.parse_args(["serve", "m", "--limit-mm-per-prompt", '{"image": 2}', "--image-fetch-timeout", "1.5",
                              "--max-image-bytes", "1000", "--max-image-pixels", "4096", "--allowed-local-media-path", "/tmp",
                              "--allowed-media-domains", "upload.wikimedia.org", "example.com"])  # fmt: skip
    assert settings_from_args(args).media == MediaSettings(2, 1.5, 1000, 4096, "/tmp", ("upload.wikimedia.org", "example.com"))
    assert settings_from_args(parser.parse_args(["serve", "m"])).media.allowed_local_media_path is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--limit-mm-per-prompt", '{"video": 1}'])
    with pytest.raises(ValueError, match="not a directory"):
        MediaSettings(allowed_local_media_path="/nonexistent/dir")


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow  # no real model, but ~40 s: transformers writes the folder, a server subprocess starts
def test_openai_client_on_qwenkit_serve_with_a_tiny_vl_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`qwenkit serve` on a tiny random Qwen2.5-VL folder, the unmodified openai client, a base64
    PNG: the reply's tokens (and text, prompt length) equal LLM.chat's on the same messages
    (greedy); the same image again is a prefix-cache hit (usage.cached_tokens == LLM's and
    /metrics' hit counter rises by it); another image with the same text hits only the blocks
    before the image."""
    openai = pytest.importorskip("openai")
    import httpx

    from qwenkit import LLM, SamplingParams
    from tests.serve_utils import ServerProcess, metric_value
    from tests.vl_tiny import IMAGE_PAD, make_tiny_vl

    folder = make_tiny_vl(tmp_path_factory.mktemp("tiny_vl") / "model")
    srv = ServerProcess(folder, "-q", "none", "--block-size", "4", "--threads", "1", "--no-structured-warmup",
                        "--served-model-name", "tiny-vl", log_path=tmp_path_factory.mktemp("log") / "serve.log")  # fmt: skip
    try:
        llm = LLM(str(folder), quantization="none", block_size=4)  # loads while the server starts
        srv.wait_ready(120)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        rng = np.random.default_rng(3)
        pics = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB") for _ in range(2)]

        def messages(pic: Image.Image) -> list[dict[str, Any]]:
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(pic))}},
                                                 {"type": "text", "text": "Describe the picture."}]}]  # fmt: skip

        def ask(pic: Image.Image) -> Any:
            return client.chat.completions.create(
                model="tiny-vl", messages=messages(pic), max_tokens=8, temperature=0, logprobs=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip

        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        want = llm.chat(messages(pics[0]), params, use_tqdm=False)[0]
        want_again = llm.chat(messages(pics[0]), params, use_tqdm=False)[0]
        tok = llm.get_tokenizer()
        first_pad = want.prompt_token_ids.index(IMAGE_PAD)
        last_pad = len(want.prompt_token_ids) - 1 - want.prompt_token_ids[::-1].index(IMAGE_PAD)

        r = ask(pics[0])
        got_bytes = [bytes(t.bytes or []) for t in r.choices[0].logprobs.content]
        assert got_bytes == [tok.token_bytes(t) for t in want.outputs[0].token_ids]
        assert r.choices[0].message.content == want.outputs[0].text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 8
        assert want.prompt_token_ids.count(IMAGE_PAD) > 1  # the placeholder was expanded
        stream = client.chat.completions.create(model="tiny-vl", messages=messages(pics[0]), max_tokens=8,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.outputs[0].text

        hits = lambda: metric_value(httpx.get(srv.url + "/metrics").text, "qwenkit:prefix_cache_hits_total")  # noqa: E731
        before = hits()
        again = ask(pics[0])
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == want_again.num_cached_tokens and cached > last_pad  # every image token came from the cache
        assert hits() - before == cached
        assert [bytes(t.bytes or []) for t in again.choices[0].logprobs.content] == got_bytes

        other = ask(pics[1])  # same text, other pixels: only full blocks before the image may hit
        assert other.usage.prompt_tokens_details.cached_tokens <= first_pad
        assert other.usage.prompt_tokens == r.usage.prompt_tokens
    finally:
        assert srv.stop() == 0, srv.log()
