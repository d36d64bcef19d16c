"""The web chat page in headless Chromium (selenium + Debian's chromedriver): type a question,
watch the answer stream in, code blocks rendered, tokens/s shown, history kept across turns.

The server is the real app on uvicorn (loopback) over a scripted engine that emits one token
every 40 ms, so the streaming is observable and the answer is known.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from qwenkit.serve.settings import ServerSettings
from tests.serve_utils import FakeEngine
from tests.test_serve_ops import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ANSWER = "Here is how:\n```python\nprint('hello from qwenkit')\n```\nThat prints a greeting. Done."
CHROME_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1100,800",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium test needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    opts = Options()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def wait_until(pred: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_an_answer(tiny_tokenizer: Any, driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    tok = tiny_tokenizer
    fake = FakeEngine(tok, lambda *a: ANSWER, delay=0.04)
    with live_server(ServerSettings(model="m", structured_warmup=False), fake) as (url, _state):
        driver.get(url + "/")
        wait_until(lambda: driver.find_element(By.ID, "model").text == "fake-model", what="the model name")

        def ask(question: str) -> Any:
            n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            box = driver.find_element(By.ID, "prompt")
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            return wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n:] or None, what="an answer")[0]

        answer = ask("How do I print a greeting in Python?")
        partial = wait_until(lambda: answer.get_attribute("data-state") == "streaming" and answer.text.strip() and answer.text,
                             what="a partial answer")  # fmt: skip
        wait_until(lambda: answer.get_attribute("data-state") == "done", what="the end of the answer")
        final = answer.text
        assert len(partial) < len(final), "the answer did not stream"
        assert "That prints a greeting. Done." in final
        code = answer.find_element(By.CSS_SELECTOR, "pre code.language-python")
        assert code.text == "print('hello from qwenkit')"
        stats = driver.find_element(By.ID, "stats").text
        assert "tok/s" in stats and stats.split()[0].isdigit() and int(stats.split()[0]) > 5

        ask("And in one line?")
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1].get_attribute("data-state") == "done",
                   what="the second answer")  # fmt: skip
        second_prompt = tok.decode(fake.requests[-1][1])
        assert "How do I print a greeting in Python?" in second_prompt and "That prints a greeting. Done." in second_prompt
        assert "And in one line?" in second_prompt
        driver.save_screenshot(str(tmp_path / "chat_page.png"))


def test_chat_page_pasted_and_dropped_images(tiny_tokenizer_dir: Path, driver: Any, tmp_path: Path) -> None:
    """Paste one image and drop another into the chat box: two thumbnails, then the next message
    carries both as image_url data-URL parts (the engine gets the same pixels, in order)."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    from tests.test_serve_vision import FakeVisionEngine, vl_tokenizer

    tok = vl_tokenizer(tiny_tokenizer_dir, tmp_path / "vl_tok")
    fake = FakeVisionEngine(tok)
    pictures = [Image.new("RGB", (12, 8), (200, 30, 40)), Image.new("RGB", (7, 9), (10, 20, 250))]
    b64 = []
    for im in pictures:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        b64.append(base64.b64encode(buf.getvalue()).decode())
    with live_server(ServerSettings(model="m", structured_warmup=False), fake) as (url, _state):
        driver.get(url + "/")
        wait_until(lambda: driver.find_element(By.ID, "model").text == "fake-vl", what="the model name")
        driver.execute_script(
            """
            const file = (b64, name) => new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"});
            const box = document.getElementById("prompt");
            const paste = new DataTransfer(); paste.items.add(file(arguments[0], "a.png"));
            box.dispatchEvent(new ClipboardEvent("paste", {clipboardData: paste, bubbles: true, cancelable: true}));
            const drop = new DataTransfer(); drop.items.add(file(arguments[1], "b.png"));
            box.dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true, cancelable: true}));
            """,
            b64[0], b64[1],
        )  # fmt: skip
        thumbs = wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#attachments img.thumb")) == 2
                            and driver.find_elements(By.CSS_SELECTOR, "#attachments img.thumb"), what="two thumbnails")  # fmt: skip
        assert all(t.get_attribute("src").startswith("data:image/png;base64,") for t in thumbs)
        driver.find_element(By.ID, "prompt").send_keys("What colours?")
        driver.find_element(By.ID, "send").click()
        answer = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant") or None, what="an answer")[0]
        wait_until(lambda: answer.get_attribute("data-state") == "done", what="the end of the answer")
        assert "A picture." in answer.text
        assert driver.find_elements(By.CSS_SELECTOR, "#attachments img") == []  # sent, so cleared
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user img.thumb")) == 2
    images = fake.mm[-1]["image"]
    assert len(images) == 2
    for got, want in zip(images, pictures):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    prompt = tok.decode(fake.requests[-1][1], skip_special_tokens=False)
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2 and "What colours?" in prompt
