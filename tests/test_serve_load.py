"""Load and fault test on loopback: 512 requests, 48 at a time, against `qwenkit serve` on a tiny
random model with a small KV pool (so preemption happens), mixing streaming, non-streaming,
n=2, client disconnects mid-stream, client-side aborts and invalid requests.

Pass: no unexpected error (no 5xx, no broken stream, exact usage), every KV block back in the
pool afterwards (read through /metrics), the server still answers, and SIGTERM drains an
in-flight stream before the process exits 0. The numbers are printed and written to
`load_results.json` in the test's temp dir.
"""
from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.serve_utils import ServerProcess, metric_value, tiny_model_dir

pytestmark = pytest.mark.slow

NUM_REQUESTS = 512
CONCURRENCY = 48
TIME_LIMIT_S = 420
TOPICS = ["the sea", "a robot", "prime numbers", "Paris", "tea", "rain", "chess", "a lighthouse"]
SYSTEM = "You are a terse assistant. " * 4  # a shared prefix: prefix-cache hits


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, gguf_05b_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = tiny_model_dir(request.config, gguf_05b_path)
    srv = ServerProcess(
        model, "--threads", "1", "--max-num-seqs", "32", "--max-queue", "1024", "--max-model-len", "256",
        "--kv-cache-memory", str(80 * 16384),  # 80 blocks of 16 tokens (16 KiB each): fewer than 48 requests need
        "--no-structured-warmup", "--shutdown-timeout", "20",
        log_path=tmp_path_factory.mktemp("load") / "server.log",
    )  # fmt: skip
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Outcome:
    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.errors: list[str] = []
        self.ttft: list[float] = []
        self.latency: list[float] = []

    def count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def plan(i: int, rng: random.Random) -> dict[str, Any]:
    kind = rng.choices(
        ["stream", "chat", "completion", "n2_stream", "disconnect", "abort", "invalid"],
        weights=[30, 20, 10, 10, 15, 10, 5],
    )[0]
    topic = rng.choice(TOPICS)
    max_tokens = rng.randint(4, 24)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Write about {topic} (#{i})."}]
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "priority": rng.choice([0, 0, 1, -1])}
    if kind == "completion":
        body = {"prompt": f"{SYSTEM} Once upon a time, {topic}", "max_tokens": max_tokens}
    if kind in ("stream", "disconnect", "n2_stream"):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if kind == "n2_stream":
        body |= {"n": 2, "seed": i}
    if kind == "invalid":
        body = rng.choice([{"messages": messages, "max_tokens": -1}, {"messages": [], "n": 1}, {"prompt": "x", "temperature": "hot"}])
    return {"kind": kind, "body": body, "path": "/v1/completions" if "prompt" in body else "/v1/chat/completions",
            "abort_after": rng.uniform(0.05, 0.4), "events_before_disconnect": rng.randint(1, 4)}  # fmt: skip


async def one(client: httpx.AsyncClient, p: dict[str, Any], out: Outcome) -> None:
    kind, body, path = p["kind"], p["body"], p["path"]
    t0 = time.perf_counter()
    out.count(kind)
    if kind == "invalid":
        r = await client.post(path, json=body)
        if r.status_code != 400 or "error" not in r.json():
            out.errors.append(f"invalid request got {r.status_code}: {r.text[:200]}")
        return
    if kind == "abort":
        try:
            await asyncio.wait_for(client.post(path, json=body), p["abort_after"])
        except asyncio.TimeoutError:
            pass  # the client hung up: the server must abort the request
        return
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            out.errors.append(f"{kind}: {r.status_code} {r.text[:200]}")
            return
        u = r.json()["usage"]
        if u["total_tokens"] != u["prompt_tokens"] + u["completion_tokens"] or u["completion_tokens"] < 1:
            out.errors.append(f"{kind}: bad usage {u}")
        out.latency.append(time.perf_counter() - t0)
        return
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            out.errors.append(f"{kind}: {r.status_code} {(await r.aread())[:200]!r}")
            return
        events, first, usage, done = 0, None, None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out.errors.append(f"{kind}: stream error {chunk['error']}")
                return
            events += 1
            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
            if kind == "disconnect" and events >= p["events_before_disconnect"]:
                return  # leaving the block closes the connection mid-stream
        if not done or usage is None:
            out.errors.append(f"{kind}: stream ended without usage/[DONE] (done={done})")
            return
        if first is not None:
            out.ttft.append(first)
        out.latency.append(time.perf_counter() - t0)


async def run_load(url: str) -> tuple[Outcome, float]:
    rng = random.Random(1234)
    plans = [plan(i, rng) for i in range(NUM_REQUESTS)]
    out = Outcome()
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def guarded(p: dict[str, Any]) -> None:
            async with sem:
                try:
                    await one(client, p, out)
                except Exception as e:  # noqa: BLE001 - every surprise is a test failure
                    out.errors.append(f"{p['kind']}: {type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(guarded(p) for p in plans)), TIME_LIMIT_S)
        return out, time.perf_counter() - t0


def engine_idle(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        name: metric_value(text, f"qwenkit:{name}")
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "num_requests_in_flight",
                     "kv_cache_blocks_total", "num_preemptions_total", "prefix_cache_hits_total", "request_aborted_total")
    }  # fmt: skip


def test_load_with_disconnects_and_aborts(server: ServerProcess, tmp_path: Path) -> None:
    out, elapsed = asyncio.run(run_load(server.url))
    assert not out.errors, out.errors[:10]

    deadline = time.monotonic() + 60
    state = engine_idle(server.url)
    while time.monotonic() < deadline and (
        state["num_requests_running"] or state["num_requests_waiting"] or state["kv_cache_blocks_used"] or state["num_requests_in_flight"]
    ):  # fmt: skip
        time.sleep(0.25)
        state = engine_idle(server.url)
    assert state["kv_cache_blocks_used"] == 0, state
    assert state["num_requests_running"] == state["num_requests_waiting"] == state["num_requests_in_flight"] == 0, state
    assert state["request_aborted_total"] > 0  # the disconnects and aborts did reach the engine
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    assert "Traceback" not in server.log_path.read_text(errors="replace")

    results = {
        "requests": NUM_REQUESTS, "concurrency": CONCURRENCY, "seconds": round(elapsed, 1),
        "requests_per_s": round(NUM_REQUESTS / elapsed, 2), "mix": out.kinds, "errors": len(out.errors),
        "ttft_p50_s": round(percentile(out.ttft, 0.5), 3), "ttft_p99_s": round(percentile(out.ttft, 0.99), 3),
        "latency_p50_s": round(percentile(out.latency, 0.5), 3), "latency_p99_s": round(percentile(out.latency, 0.99), 3),
        "latency_mean_s": round(statistics.fmean(out.latency), 3), "engine_after": state,
    }  # fmt: skip
    (tmp_path / "load_results.json").write_text(json.dumps(results, indent=2))
    print("\nload test:", json.dumps(results))


def test_sigterm_drains_in_flight_stream(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the stream is running
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"  # the in-flight request finished normally
    finish = [c["finish_reason"] for line in rest[:-1] for c in json.loads(line[6:])["choices"] if c.get("finish_reason")]
    assert finish == ["length"]
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)
