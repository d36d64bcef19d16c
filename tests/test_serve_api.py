"""The HTTP layer on a scripted engine (tiny tokenizer with Qwen2.5's chat template, no model): request
validation -> OpenAI error bodies naming the field, response shapes, usage, streaming,
tool calls (streamed deltas == non-streamed message), tokenize/detokenize, template round trip."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qwenkit.serve.app import create_app
from qwenkit.serve.settings import ServerSettings
from tests.serve_utils import FakeEngine

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"],
        },
    },
}
TOOL_TEXT = (
    'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer: Any) -> Any:
    return tiny_tokenizer


def script(prompt_ids: list[int], params: Any, i: int) -> str:
    return TOOL_TEXT if params.seed == 7 else f"Hello world! choice {i}"


@pytest.fixture(scope="module")
def fake(tok: Any) -> FakeEngine:
    return FakeEngine(tok, script, max_model_len=1024)


@pytest.fixture(scope="module")
def client(fake: FakeEngine) -> Any:
    app = create_app(ServerSettings(model="fake", structured_warmup=False), lambda: fake)
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield c


def chat(client: Any, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"messages": USER, **body})


def sse_events(resp: Any) -> list[Any]:
    events = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ============================================================================ errors
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER, "max_tokens": -5}, "max_tokens"),
        ({"messages": USER, "max_tokens": "many"}, "max_tokens"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": USER, "stop": ["a"] * 40}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({}, "messages"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
         "tools.0.function.parameters"),
        ({"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": USER, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"messages": USER, "logit_bias": {"abc": 5}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"-3": 5}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"151936": 5}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"10": 100.5}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"10": "high"}}, "logit_bias"),
        ({"messages": USER, "logit_bias": [1, 2]}, "logit_bias"),
        ({"messages": USER, "allowed_token_ids": [5, 151936]}, "allowed_token_ids"),
        ({"messages": USER, "allowed_token_ids": []}, "allowed_token_ids"),
        ({"messages": USER, "bad_words": [""]}, "bad_words.0"),
    ],
)
def test_invalid_chat_requests_name_the_field(client: Any, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert err["message"]


def test_unknown_model_is_404(client: Any) -> None:
    r = chat(client, model="gpt-9")
    assert r.status_code == 404
    assert r.json()["error"] | {"message": None} == {
        "message": None, "type": "invalid_request_error", "param": "model", "code": "model_not_found"
    }


def test_malformed_json_and_non_object_body(client: Any) -> None:
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_prompt_beyond_the_context_is_400(client: Any, fake: FakeEngine) -> None:
    long = "word " * (fake.max_model_len + 10)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "messages"
    r = chat(client, max_tokens=fake.max_model_len)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": [1, 2], "suffix": "y"}, "suffix"),
        ({"prompt": "x", "suffix": "<|fim_middle|>"}, "suffix"),
        ({"prompt": "x<|fim_prefix|>", "suffix": "y"}, "prompt"),
        ({"prompt": "x", "suffix": "y", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 30}, "logprobs"),
        ({"prompt": "x", "logit_bias": {"1.5": 3}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"7": -101}}, "logit_bias"),
    ],
)
def test_invalid_completion_requests(client: Any, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_logit_bias_errors_name_the_key(client: Any) -> None:
    for bias, key in (({"5": 1, "abc": 2}, "'abc'"), ({"151936": 1}, "'151936'"), ({"9": 250}, "'9'")):
        err = client.post("/v1/completions", json={"prompt": "x", "logit_bias": bias}).json()["error"]
        assert err["param"] == "logit_bias" and key in err["message"], err


def test_processor_fields_reach_the_engine(client: Any, fake: FakeEngine) -> None:
    body = {"logit_bias": {"15": 100, "16": -50.5}, "allowed_token_ids": [15, 16], "bad_words": ["foo"], "min_tokens": 2}
    assert chat(client, **body).status_code == 200
    params = fake.requests[-1][2]
    assert params.logit_bias == {15: 100.0, 16: -50.5} and params.allowed_token_ids == [15, 16]
    assert params.bad_words == ["foo"] and params.min_tokens == 2


def test_suffix_is_a_fim_prompt(client: Any, fake: FakeEngine, tok: Any) -> None:
    r = client.post("/v1/completions", json={"prompt": "def f(x):\n    ", "suffix": "\n    return y", "max_tokens": 40})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello world! choice 0"  # the middle only
    _, prompt_ids, params, _ = fake.requests[-1]
    assert prompt_ids == tok.encode("<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>")
    assert {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|fim_pad|>")} <= set(params.stop_token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_starts_with_the_prompt(client: Any, fake: FakeEngine, tok: Any, stream: bool) -> None:
    body = {"prompt": "Say hello", "echo": True, "logprobs": 1, "max_tokens": 40, "stream": stream}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        choices = [c for e in sse_events(r) for c in e["choices"]]
        text = "".join(c["text"] for c in choices)
        lp = {k: [x for c in choices if c.get("logprobs") for x in c["logprobs"][k]] for k in ("tokens", "token_logprobs", "text_offset")}
    else:
        choice = r.json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
    prompt_ids = tok.encode("Say hello")
    assert fake.requests[-1][2].prompt_logprobs == 1
    n_prompt = len(prompt_ids)
    assert text.startswith("Say hello") and text.endswith("Hello world! choice 0")
    assert lp["token_logprobs"][:n_prompt] == [None] + [-0.25] * (n_prompt - 1)
    assert "".join(lp["tokens"][:n_prompt]) == "Say hello" and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]).startswith(text) and lp["token_logprobs"][n_prompt] == -0.5


def test_prompt_ids_must_be_in_the_vocabulary(client: Any, fake: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": [fake.vocab_size], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert client.post("/v1/completions", json={"prompt": [fake.vocab_size - 1], "max_tokens": 2}).status_code == 200


# ============================================================================ responses
def test_chat_non_stream_shape_and_usage(client: Any, tok: Any) -> None:
    r = chat(client, n=2, max_tokens=50)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello world! choice 0", "Hello world! choice 1"]
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    prompt_ids = client.post("/tokenize", json={"messages": USER}).json()["tokens"]
    completion = 2 * (len(tok.encode("Hello world! choice 0")) + 1)  # + EOS each
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == completion
    assert body["usage"]["total_tokens"] == len(prompt_ids) + completion


def test_chat_stream_assembles_to_the_non_streamed_answer(client: Any) -> None:
    full = chat(client, max_tokens=4).json()
    assert full["choices"][0]["finish_reason"] == "length"
    r = chat(client, max_tokens=4, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert all("usage" not in e for e in events[:-1])


def test_logprobs_shapes(client: Any) -> None:
    body = chat(client, logprobs=True, top_logprobs=2, max_tokens=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"} and len(content[0]["top_logprobs"]) == 2
    comp = client.post("/v1/completions", json={"prompt": "Say", "logprobs": 1, "max_tokens": 3}).json()
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3


def test_completions_batch_echo_and_stream(client: Any, tok: Any) -> None:
    body = client.post("/v1/completions", json={"prompt": ["A", "B"], "n": 2, "echo": True, "max_tokens": 40}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][2]["text"] == "BHello world! choice 0"
    r = client.post("/v1/completions", json={"prompt": tok.encode("Hello world"), "max_tokens": 40, "stream": True})
    events = sse_events(r)
    assert "".join(c["text"] for e in events for c in e["choices"]) == "Hello world! choice 0"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_non_stream_and_stream_agree(client: Any) -> None:
    req = {"tools": [WEATHER_TOOL], "seed": 7, "max_tokens": 200}
    full = chat(client, **req).json()
    choice = full["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] == "I will look it up."
    calls = msg["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"location": "Paris", "unit": "celsius"}),
        ("function", "get_weather", {"location": "Tokyo"}),
    ]
    assert all(c["id"].startswith("call_") for c in calls)

    events = sse_events(chat(client, stream=True, **req))
    content, streamed = "", {}
    for e in events:
        for c in e["choices"]:
            delta = c["delta"]
            piece = delta.get("content") or ""
            assert "<tool_call>" not in piece and "</tool_call>" not in piece
            content += piece
            for tc in delta.get("tool_calls") or []:
                entry = streamed.setdefault(tc["index"], {"name": None, "arguments": ""})
                if tc["function"].get("name"):
                    assert entry["name"] is None and tc["id"].startswith("call_")
                    entry["name"] = tc["function"]["name"]
                entry["arguments"] += tc["function"].get("arguments") or ""
    assert content == msg["content"]
    assert [(v["name"], v["arguments"]) for _, v in sorted(streamed.items())] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["tool_calls"]


def test_tool_choice_none_leaves_text_alone(client: Any) -> None:
    full = chat(client, tools=[WEATHER_TOOL], tool_choice="none", seed=7, max_tokens=200).json()
    assert full["choices"][0]["message"]["content"] == TOOL_TEXT
    assert full["choices"][0]["message"]["tool_calls"] == []
    assert full["choices"][0]["finish_reason"] == "stop"


# ============================================================================ template & tokenizer
def test_tool_conversation_round_trips_through_the_template(client: Any, tok: Any) -> None:
    """parse(model output) -> OpenAI message -> chat template reproduces the model's own text."""
    full = chat(client, tools=[WEATHER_TOOL], seed=7, max_tokens=200).json()
    msg = full["choices"][0]["message"]
    convo = USER + [
        {"role": "assistant", "content": msg["content"], "tool_calls": msg["tool_calls"]},
        {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": '{"temperature": 21}'},
        {"role": "tool", "tool_call_id": msg["tool_calls"][1]["id"], "content": '{"temperature": 30}'},
    ]
    ids = client.post("/tokenize", json={"messages": convo, "tools": [WEATHER_TOOL]}).json()["tokens"]
    text = client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "<|im_start|>assistant\n" + TOOL_TEXT + "<|im_end|>" in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert "<tools>" in text and '"name": "get_weather"' in text
    r = chat(client, messages=convo, tools=[WEATHER_TOOL])  # the follow-up turn is accepted
    assert r.status_code == 200


def test_tokenize_detokenize(client: Any, tok: Any) -> None:
    ids = tok.encode("Hello world")
    r = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 1024
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_models_and_simple_chat(client: Any) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake-model"
    r = client.post("/chat", json={"prompt": "hi", "max_tokens": 50})
    assert r.status_code == 200 and r.json()["response"] == "Hello world! choice 0"
    events = [line[6:] for line in client.post("/chat", json={"prompt": "hi", "stream": True}).text.split("\n")
              if line.startswith("data: ")]  # fmt: skip
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e).get("response", "") for e in events[:-1]) == "Hello world! choice 0"


def test_priority_from_body_or_header(client: Any, fake: FakeEngine) -> None:
    chat(client, max_tokens=2, priority=-3)
    assert fake.requests[-1][3] == -3
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, headers={"X-Priority": "5"})
    assert fake.requests[-1][3] == 5
    r = client.post("/v1/chat/completions", json={"messages": USER}, headers={"X-Priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Priority"
