"""Operations on a scripted engine: API key, 503 while loading, 429 back-pressure, request
timeout, cancellation on client disconnect (the engine request is aborted), metrics, CORS,
structured access logs. A real uvicorn runs in a thread where a socket is needed."""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from qwenkit.serve.app import create_app
from qwenkit.serve.settings import ServerSettings
from tests.serve_utils import HOST, FakeEngine, free_port, metric_value

USER = [{"role": "user", "content": "hi"}]
LONG = "word " * 200  # what the slow fake engine "generates": ~200 tokens


@pytest.fixture(scope="module")
def tok(tiny_tokenizer: Any) -> Any:
    return tiny_tokenizer


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@contextmanager
def app_client(settings: ServerSettings, factory: Callable[[], Any], ready: bool = True) -> Iterator[TestClient]:
    app = create_app(settings, factory)
    with TestClient(app) as c:
        if ready:
            assert wait_for(lambda: c.get("/ready").status_code == 200)
        yield c


@contextmanager
def live_server(settings: ServerSettings, engine: Any) -> Iterator[tuple[str, Any]]:
    """The app on a real uvicorn (in a thread) on a free loopback port."""
    app = create_app(settings, lambda: engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", timeout_keep_alive=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        assert wait_for(lambda: _ready(url), 20)
        yield url, app.state.qwenkit
    finally:
        server.should_exit = True
        thread.join(20)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ============================================================================ API key
def test_api_key(tok: Any) -> None:
    fake = FakeEngine(tok)
    with app_client(ServerSettings(model="m", api_key="s3cret", structured_warmup=False), lambda: fake) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        for public in ("/health", "/ready", "/metrics", "/"):
            assert c.get(public).status_code == 200, public


# ============================================================================ lifecycle
def test_503_while_loading_then_ready(tok: Any) -> None:
    gate = threading.Event()
    fake = FakeEngine(tok)

    def slow_factory() -> FakeEngine:
        gate.wait(20)
        return fake

    with app_client(ServerSettings(model="m", structured_warmup=False), slow_factory, ready=False) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 503 and c.get("/ready").json()["status"] == "loading"
        r = c.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        assert wait_for(lambda: c.get("/ready").status_code == 200)
        assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
    assert fake.shut_down  # the lifespan's shutdown stops the engine


def test_load_failure_is_reported(tok: Any) -> None:
    def broken() -> FakeEngine:
        raise FileNotFoundError("no such model")

    with app_client(ServerSettings(model="m"), broken, ready=False) as c:
        assert wait_for(lambda: c.get("/health").status_code == 503)
        assert c.get("/health").json()["status"] == "error"
        assert c.get("/ready").status_code == 503
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503


# ============================================================================ back-pressure
def test_queue_full_is_429_with_retry_after(tok: Any) -> None:
    fake = FakeEngine(tok, lambda *a: LONG, delay=0.05)
    settings = ServerSettings(model="m", max_num_seqs=1, max_queue=1, structured_warmup=False)
    with live_server(settings, fake) as (url, state), httpx.Client(timeout=30) as client:
        body = {"messages": USER, "stream": True, "max_tokens": 100}
        with client.stream("POST", url + "/v1/chat/completions", json=body) as a, \
             client.stream("POST", url + "/v1/chat/completions", json=body) as b:  # fmt: skip
            assert a.status_code == b.status_code == 200
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert wait_for(lambda: state.in_flight == 0)
        assert httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=30).status_code == 200
        assert metric_value(httpx.get(url + "/metrics").text, "qwenkit:request_rejected_total") == 1


# ============================================================================ cancellation
def test_client_disconnect_aborts_the_engine_request(tok: Any) -> None:
    fake = FakeEngine(tok, lambda *a: LONG, delay=0.02)
    with live_server(ServerSettings(model="m", structured_warmup=False), fake) as (url, state):
        # streaming: read a few events, then hang up
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/chat/completions",
                               json={"messages": USER, "stream": True, "max_tokens": 150}) as r:  # fmt: skip
                lines = r.iter_lines()
                assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
        assert wait_for(lambda: len(fake.aborted) == 1 and fake.active == 0 and state.in_flight == 0)
        # non-streaming: the client gives up before the answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 150}, timeout=0.5)
        assert wait_for(lambda: len(fake.aborted) == 2 and fake.active == 0 and state.in_flight == 0)
        text = httpx.get(url + "/metrics").text
        assert metric_value(text, "qwenkit:request_aborted_total") == 2
        assert httpx.post(url + "/v1/chat/completions", json={"messages": USER}, timeout=30).status_code == 200


def test_request_timeout_is_504_and_aborts(tok: Any) -> None:
    fake = FakeEngine(tok, lambda *a: LONG, delay=0.02)
    settings = ServerSettings(model="m", request_timeout=0.5, structured_warmup=False)
    with app_client(settings, lambda: fake) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 150})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 150, "stream": True})
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
        assert wait_for(lambda: len(fake.aborted) == 2 and fake.active == 0)
        assert c.app.state.qwenkit.in_flight == 0


# ============================================================================ metrics, CORS, logs
def test_metrics_names(tok: Any) -> None:
    fake = FakeEngine(tok)
    with app_client(ServerSettings(model="m", structured_warmup=False), lambda: fake) as c:
        for _ in range(3):
            assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
        r = c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
    for name in (
        "qwenkit:num_requests_running", "qwenkit:num_requests_waiting", "qwenkit:kv_cache_usage_perc",
        "qwenkit:kv_cache_blocks_total", "qwenkit:kv_cache_blocks_used", "qwenkit:prefix_cache_queries_total",
        "qwenkit:prefix_cache_hits_total", "qwenkit:prompt_tokens_total", "qwenkit:generation_tokens_total",
        "qwenkit:time_to_first_token_seconds_bucket", "qwenkit:e2e_request_latency_seconds_bucket",
        "qwenkit:time_per_output_token_seconds_bucket", "qwenkit:request_success_total",
    ):  # fmt: skip
        assert f"\n{name}{{" in text, name
    assert metric_value(text, "qwenkit:e2e_request_latency_seconds_count") == 3
    assert metric_value(text, "qwenkit:kv_cache_blocks_total") == 100
    assert 'model_name="fake-model"' in text


def test_cors_and_access_log(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEngine(tok)
    settings = ServerSettings(model="m", allowed_origins=("http://app.test",), structured_warmup=False)
    with app_client(settings, lambda: fake) as c, caplog.at_level(logging.INFO, "qwenkit.serve.access"):
        pre = c.options("/v1/chat/completions", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.test"
        r = c.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "qwenkit.serve.access"]
    entry = next(e for e in lines if e["path"] == "/v1/models")
    assert entry["status"] == 200 and entry["request_id"] == "abc-123" and entry["duration_ms"] >= 0


# ============================================================================ CLI
def test_serve_cli_arguments() -> None:
    import argparse

    from qwenkit.serve.cli import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser(prog="qwenkit")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "serve", "model.gguf", "--port", "9000", "--api-key", "k", "--max-queue", "3", "--max-num-seqs", "4",
        "--allowed-origins", "http://a.test,http://b.test", "--max-model-len", "2048", "--no-enable-prefix-caching",
        "--request-timeout", "0",
    ])  # fmt: skip
    s = settings_from_args(args)
    assert (args.port, s.model, s.api_key, s.max_in_flight, s.request_timeout) == (9000, "model.gguf", "k", 7, None)
    assert s.allowed_origins == ("http://a.test", "http://b.test")
    assert s.engine_args == {"block_size": 16, "enable_prefix_caching": False, "max_model_len": 2048}
