"""Grammar-constrained decoding (xgrammar, in the engine) on the tiny tokenizer's vocabulary and
(slow) the real Qwen one: whatever the logits, the output parses and validates; the batched
bitmask equals the per-row one. Then the server on a tiny random Qwen2 with the real engine:
response_format / forced tool calls with n=2, logit_bias, fill-in-the-middle `suffix`, `echo`
with `logprobs`."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient

from qwenkit.engine.structured_output import (
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutputError,
    apply_grammar_bitmasks,
)
from qwenkit.sampling_params import StructuredOutputsParams, ToolCallSpec
from qwenkit.serve.tool_parser import parse_tool_calls
from tests.serve_utils import tiny_model_dir, wait_ready
from tests.test_tokenizer import load_ours_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "rain": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "rain", "hours"],
}
TOOL_PARAMS = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 5}, "unit": {"enum": ["c", "f"]}},
    "required": ["location", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": TOOL_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}}, "required": ["tz"]}}},
]  # bounded arguments: a random model fills free-form ones until max_tokens


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> Any:
    """The tiny tokenizer, and (slow) the real one."""
    return load_ours_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tok: Any) -> GrammarCompiler:
    assert tok.eos_token_ids[:2] == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    return GrammarCompiler(tok, len(tok), tok.eos_token_ids)


def decode_random(tok: Any, compiled: Any, seed: int, max_tokens: int = 1000) -> str:
    """Sample from random logits under the grammar until EOS."""
    matcher = GrammarMatcher(compiled)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = apply_grammar_bitmasks(torch.randn(1, len(tok), generator=gen) * 3, [matcher])[0]
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if token in tok.eos_token_ids:
            return tok.decode(out)
        matcher.accept(token)
        out.append(token)
    raise AssertionError(f"no EOS after {max_tokens} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("seed", range(2))
def test_json_schema_output_always_validates(tok: Any, compiler: GrammarCompiler, seed: int) -> None:
    compiled = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    jsonschema.validate(json.loads(decode_random(tok, compiled, seed)), SCHEMA)


def test_json_object_output_parses(tok: Any, compiler: GrammarCompiler) -> None:
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(json_object=True)))
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    for _ in range(6):  # a few free tokens: the output starts as JSON
        logits = apply_grammar_bitmasks(torch.randn(1, len(tok), generator=gen), [matcher])[0]
        out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
        matcher.accept(out[-1])
    assert tok.decode(out).lstrip().startswith(("{", "["))


def test_forced_tool_call_parses(tok: Any, compiler: GrammarCompiler) -> None:
    so = StructuredOutputsParams(tool_calls=[ToolCallSpec("get_weather", TOOL_PARAMS), ToolCallSpec("get_time")])
    compiled = compiler.compile(so)
    for seed in range(2):
        text = decode_random(tok, compiled, seed)
        parsed = parse_tool_calls(text)
        assert parsed.content is None and len(parsed.tool_calls) == 1, text
        call = parsed.tool_calls[0]
        args = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(args, TOOL_PARAMS)
        else:
            assert call.name == "get_time" and isinstance(args, dict)


def test_length_bounded_strings_exclude_control_characters(tok: Any, compiler: GrammarCompiler) -> None:
    """xgrammar 0.2 lets a minLength/maxLength string hold raw control characters (invalid
    JSON); the compiler excludes them as in unbounded strings."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(json=schema)))
    for t in tok.encode('{"s": "a'):
        matcher.accept(t)
    allowed = torch.isfinite(apply_grammar_bitmasks(torch.zeros(1, len(tok)), [matcher])[0])
    for ch in ("\x01", "\t", "\x1f"):
        (t,) = tok.encode(ch)
        assert not allowed[t], repr(ch)
    assert allowed[tok.encode("b")[0]] and allowed[tok.encode('"')[0]]


def test_batched_bitmask_equals_per_row(tok: Any, compiler: GrammarCompiler) -> None:
    VOCAB = len(tok)
    a = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    b = compiler.compile(StructuredOutputsParams(tool_calls=[ToolCallSpec("get_weather", TOOL_PARAMS)]))
    logits = torch.randn(3, VOCAB)
    batched = apply_grammar_bitmasks(logits.clone(), [GrammarMatcher(a), None, GrammarMatcher(b)])
    rows = [
        apply_grammar_bitmasks(logits[0:1].clone(), [GrammarMatcher(a)])[0],
        logits[1],
        apply_grammar_bitmasks(logits[2:3].clone(), [GrammarMatcher(b)])[0],
    ]
    assert torch.equal(batched, torch.stack(rows))
    assert int(torch.isfinite(batched[0]).sum()) < VOCAB and torch.isfinite(batched[1]).all()


def test_invalid_schemas_name_the_field(compiler: GrammarCompiler) -> None:
    with pytest.raises(StructuredOutputError) as e:
        compiler.compile(StructuredOutputsParams(json={"type": "objekt"}))
    assert e.value.param == "structured_outputs.json"
    with pytest.raises(StructuredOutputError, match="at most"):  # would take seconds and GBs to compile
        compiler.compile(StructuredOutputsParams(json={"type": "string", "minLength": 10**8}))
    with pytest.raises(StructuredOutputError) as e:
        compiler.compile(StructuredOutputsParams(tool_calls=[ToolCallSpec("f"), ToolCallSpec("g", {"type": 5})]))
    assert e.value.param == "structured_outputs.tool_calls.1.parameters"
    with pytest.raises(ValueError, match="structured_outputs.json"):
        StructuredOutputsParams(json=["not", "a", "schema"])  # type: ignore[arg-type]


# ============================================================================ server, real engine
@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest, tiny_tokenizer_dir: Path) -> Iterator[TestClient]:
    from qwenkit.serve.app import create_app
    from qwenkit.serve.engine_client import load_engine_client
    from qwenkit.serve.settings import ServerSettings

    model_dir = tiny_model_dir(request.config, tiny_tokenizer_dir)
    app = create_app(ServerSettings(model=str(model_dir)), lambda: load_engine_client(model_dir, max_model_len=2048))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def chat(client: TestClient, **body: Any) -> Any:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "weather?"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_json_schema_with_n_2(client: TestClient) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    body = chat(client, response_format=rf, n=2, seed=0, temperature=1.0, max_tokens=200)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts[0] != texts[1]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_forced_tool_choice(client: TestClient) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        body = chat(client, tools=TOOLS, tool_choice=choice, seed=1, temperature=1.0, max_tokens=200)
        msg = body["choices"][0]["message"]
        assert body["choices"][0]["finish_reason"] == "tool_calls" and len(msg["tool_calls"]) == 1, msg
        if choice is named:
            assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(msg["tool_calls"][0]["function"]["arguments"]), TOOL_PARAMS)


def test_bad_schema_is_400_naming_the_field(client: TestClient) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "objekt"}}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "response_format": rf})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"


def test_logit_bias_forces_and_bans_over_http(client: TestClient, tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    forced = tok.encode(" banana")[0]
    body = {"prompt": "Fruit:", "max_tokens": 5, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "logit_bias": {str(forced): 100}, "logprobs": 0}).json()
    tokens = r["choices"][0]["logprobs"]["tokens"]
    assert tokens == [tok.decode([forced])] * 5
    free = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"]
    banned = {str(t): -100 for t in tok.encode("".join(free))}
    again = client.post("/v1/completions", json={**body, "logit_bias": banned, "logprobs": 0}).json()
    assert not set(again["choices"][0]["logprobs"]["tokens"]) & set(free)


def test_suffix_fill_in_the_middle(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):\n    ", "suffix": "\n", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "<|fim" not in choice["text"] and not choice["text"].startswith("def add")
    assert r.json()["usage"]["prompt_tokens"] > 3


def test_echo_with_logprobs_has_prompt_logprobs(client: TestClient, tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    prompt = "The quick brown fox"
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    n = len(tok.encode(prompt))
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == n + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) >= 2 for t in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"][:n]) == prompt and lp["text_offset"][n] == len(prompt)
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    events = [json.loads(x[6:]) for x in streamed.text.split("\n") if x.startswith("data: {")]
    got = [v for e in events for c in e["choices"] if c.get("logprobs") for v in c["logprobs"]["token_logprobs"]]
    assert got == lp["token_logprobs"]


@pytest.mark.slow
def test_fim_middle_matches_transformers_greedy(gguf_05b_path: Path) -> None:
    """Qwen2.5-Coder-0.5B-Instruct: the server's `suffix` middle (greedy) equals transformers'
    greedy continuation of the hand-built FIM prompt, cut at the first FIM end token. (This
    instruct checkpoint writes no end token after the middle: it goes on past it, repeating the
    suffix, so both run to max_tokens; base Coder checkpoints end with <|endoftext|>.)"""
    import transformers

    from qwenkit.serve.app import create_app
    from qwenkit.serve.engine_client import load_engine_client
    from qwenkit.serve.settings import ServerSettings
    from qwenkit.tokenizer.fim import FIM_END_TOKENS

    prefix = "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n"
    suffix = "\n    return quicksort(left) + middle + quicksort(right)\n"
    settings = ServerSettings(model=str(gguf_05b_path), structured_warmup=False)
    engine = load_engine_client(gguf_05b_path, max_model_len=1024, kv_cache_memory="256MiB")
    with TestClient(create_app(settings, lambda: engine)) as c:
        deadline = time.monotonic() + 120
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        body = {"prompt": prefix, "suffix": suffix, "max_tokens": 64, "temperature": 0}
        r = c.post("/v1/completions", json=body).json()
    choice = r["choices"][0]
    tok = engine.tokenizer
    ids = tok.encode(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
    assert r["usage"]["prompt_tokens"] == len(ids)
    stops = {tok.token_to_id(t) for t in FIM_END_TOKENS} | set(engine.eos_token_ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_05b_path.parent, gguf_file=gguf_05b_path.name, dtype=torch.float32
    ).eval()
    out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=sorted(stops), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    assert choice["text"] == tok.decode(new[:end], skip_special_tokens=True)
    assert choice["text"].strip() and choice["finish_reason"] == ("stop" if end < len(new) else "length")
