"""The official `openai` client, unmodified, against `qwenkit serve` running the real
Qwen2.5-Coder-0.5B-Instruct on loopback (one server for the module; loading takes ~15 s)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

from tests.serve_utils import ServerProcess

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

API_KEY = "test-key"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def server(gguf_05b_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = ServerProcess(
        gguf_05b_path, "--api-key", API_KEY, "--served-model-name", "qwen-0.5b",
        "--max-model-len", "4096", "--kv-cache-memory", "1GiB", "--max-num-seqs", "8",
        log_path=log,
    )  # fmt: skip
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_models_and_auth(server: ServerProcess, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["qwen-0.5b"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_non_stream_and_stream_agree(client: Any) -> None:
    messages = [{"role": "user", "content": "What is 2+2? Reply with just the number."}]
    full = client.chat.completions.create(model="qwen-0.5b", messages=messages, temperature=0, max_tokens=16)
    answer = full.choices[0].message.content
    assert "4" in answer and full.choices[0].finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(
        model="qwen-0.5b", messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions(client: Any) -> None:
    r = client.completions.create(model="qwen-0.5b", prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.choices[0].text.strip()
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="qwen-0.5b", prompt="def fibonacci(n):", max_tokens=12, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == r.choices[0].text


def test_n_and_seed_reproducibility(client: Any) -> None:
    kw = dict(model="qwen-0.5b", messages=[{"role": "user", "content": "Name a color."}], temperature=1.0, max_tokens=8, n=2)
    a = client.chat.completions.create(seed=1234, **kw)
    b = client.chat.completions.create(seed=1234, **kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert all(c.message.content for c in a.choices) and a.usage.completion_tokens == b.usage.completion_tokens


def test_logprobs(client: Any) -> None:
    r = client.chat.completions.create(
        model="qwen-0.5b", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=5,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_stop(client: Any) -> None:
    r = client.chat.completions.create(
        model="qwen-0.5b", messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        temperature=0, max_tokens=40, stop=["5"],
    )  # fmt: skip
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "5" not in text and "4" in text


def test_tool_call(client: Any) -> None:
    r = client.chat.completions.create(model="qwen-0.5b", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], temperature=0, max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    assert not (choice.message.content or "").strip().startswith("<tool_call>")

    # streamed deltas assemble to exactly the same call
    name, args, content = None, "", ""
    for chunk in client.chat.completions.create(model="qwen-0.5b", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL],
                                                temperature=0, max_tokens=48, stream=True):  # fmt: skip
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
    assert (name, args) == (call.function.name, call.function.arguments)
    assert "<tool_call>" not in content

    # the tool result goes back through the template and the model answers in text
    follow = client.chat.completions.create(
        model="qwen-0.5b", tools=[WEATHER_TOOL], temperature=0, max_tokens=30,
        messages=WEATHER_QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
        ],
    )  # fmt: skip
    assert follow.choices[0].message.content and "21" in follow.choices[0].message.content


def test_named_tool_choice_is_forced(client: Any) -> None:
    r = client.chat.completions.create(
        model="qwen-0.5b", messages=[{"role": "user", "content": "Hi there!"}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=64,
    )  # fmt: skip
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_json_schema_response(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "languages": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "languages"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="qwen-0.5b", temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Describe a fictional programmer as JSON with name, age and languages."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_invalid_requests_are_4xx(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-0.5b", messages=WEATHER_QUESTION, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=WEATHER_QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-0.5b", messages=[{"role": "user", "content": "hi " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_logit_bias_forces_and_bans(server: ServerProcess, client: Any) -> None:
    import httpx

    kw = dict(model="qwen-0.5b", messages=[{"role": "user", "content": "Name a bird."}], max_tokens=6, logprobs=True)
    free = client.chat.completions.create(temperature=0, **kw)
    first = free.choices[0].logprobs.content[0].token
    forced_id = 9707  # "Hello"
    forced = client.chat.completions.create(temperature=0.8, seed=3, logit_bias={str(forced_id): 100}, **kw)
    assert [t.token for t in forced.choices[0].logprobs.content] == ["Hello"] * 6
    # ban the greedy first token (and any spelling of it): the reply starts differently
    tok = httpx.post(server.url + "/tokenize", json={"prompt": first}, headers={"Authorization": f"Bearer {API_KEY}"})
    ids = tok.json()["tokens"]
    banned = client.chat.completions.create(temperature=0, logit_bias={str(i): -100 for i in ids}, **kw)
    assert all(t.token != first for t in banned.choices[0].logprobs.content)
    assert banned.choices[0].message.content != free.choices[0].message.content


def test_bad_logit_bias_is_400_naming_the_field(client: Any) -> None:
    for bias in ({"hello": 5}, {"99999999": 5}, {"9707": 101}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="qwen-0.5b", messages=WEATHER_QUESTION, max_tokens=2, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias", bias


def test_suffix_fill_in_the_middle(client: Any) -> None:
    """`suffix` (what editor plugins send) == the same FIM prompt built by hand, greedy; the
    hand-built prompt is checked against transformers in test_serve_structured.py."""
    prefix = "def is_even(n):\n    "
    suffix = "\n\nprint(is_even(4))\n"
    r = client.completions.create(model="qwen-0.5b", prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    by_hand = client.completions.create(
        model="qwen-0.5b", prompt=f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>", max_tokens=16,
        temperature=0,
    )  # fmt: skip
    assert r.choices[0].text == by_hand.choices[0].text and "return" in r.choices[0].text
    assert r.usage.prompt_tokens == by_hand.usage.prompt_tokens
