"""Hermes tool-call parser: extraction, tags never leak, and streamed == non-streamed for any split."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from qwenkit.serve.tool_parser import HermesToolParser, ParsedToolCall, parse_tool_calls


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(name: str, args: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


WEATHER = call("get_weather", {"location": "Paris, France", "unit": "celsius"})
CASES = [
    "Hello world",
    "  \n leading and trailing whitespace \n ",
    WEATHER,
    "Let me check.\n" + WEATHER,
    WEATHER + "\n" + call("get_time", {"tz": "Europe/Paris"}),
    call("nested", {"x": [1, {"y": "}]{["}], "s": "quote \" and \\ backslash", "u": "中文 ✓"}),
    '<tool_call>\n{"arguments": {"q": 1}, "name": "args_first"}\n</tool_call>',
    '<tool_call>\n{"name": "string_args", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
    '<tool_call>\n{"name": "no_args"}\n</tool_call>',
    '<tool_call>\n{"name": "num_args", "arguments": 42}\n</tool_call>',
    "<tool_call>\nnot json at all</tool_call> and text",
    '<tool_call>\n{"nam": "typo"}\n</tool_call>',
    '<tool_call>\n{"name": "truncated", "arguments": {"location": "Par',
    '<tool_call>\n{"name": "trunc',
    "a <tool_c b </tool_call> < <tool_call",
    "x < y and <b>bold</b> <tool_callx>",
    WEATHER + "\nThe weather tool was called.",
]


def assemble(text: str, cuts: list[int], **kw) -> tuple[str | None, list[ParsedToolCall], list[str]]:
    """Feed `text` split at `cuts`; return (content, calls, raw content deltas)."""
    parser = HermesToolParser(id_factory=ids(), **kw)
    content = ""
    deltas: list[str] = []
    calls: dict[int, ParsedToolCall] = {}
    bounds = [0, *cuts, len(text)]
    pieces = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    for piece in pieces:
        content += piece.content
        deltas.append(piece.content)
        for c in piece.tool_calls:
            if c.name is not None:
                assert c.index not in calls, "a call header was sent twice"
                calls[c.index] = ParsedToolCall(c.id or "", c.name, "")
            calls[c.index].arguments += c.arguments
    ordered = [calls[i] for i in sorted(calls)]
    assert list(sorted(calls)) == list(range(len(calls)))
    return (content or None) if ordered else content, ordered, deltas


@pytest.mark.parametrize("text", CASES)
def test_streamed_equals_non_streamed_for_random_splits(text: str) -> None:
    ref = parse_tool_calls(text, id_factory=ids())
    rng = random.Random(hash(text) & 0xFFFF)
    splits = [[], list(range(1, len(text)))]  # whole, and one character at a time
    for _ in range(60):
        k = rng.randint(1, max(1, len(text) // 3))
        splits.append(sorted(rng.sample(range(1, max(2, len(text))), min(k, max(1, len(text) - 1)))))
    for cuts in splits:
        content, calls, _ = assemble(text, cuts)
        assert (content, calls) == (ref.content, ref.tool_calls), cuts


def test_extraction_values() -> None:
    r = parse_tool_calls("Let me check.\n" + WEATHER)
    assert r.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [
        ("get_weather", {"location": "Paris, France", "unit": "celsius"})
    ]
    assert r.tool_calls[0].id.startswith("call_")

    two = parse_tool_calls(WEATHER + "\n" + call("get_time", {"tz": "UTC"}))
    assert two.content is None
    assert [c.name for c in two.tool_calls] == ["get_weather", "get_time"]
    assert len({c.id for c in two.tool_calls}) == 2

    assert parse_tool_calls("no calls here").content == "no calls here"
    assert parse_tool_calls("  \n ").content == "  \n "  # a reply without calls comes back as is
    assert parse_tool_calls('<tool_call>\n{"name": "s", "arguments": "{\\"a\\": 1}"}\n</tool_call>').tool_calls[0].arguments == '{"a": 1}'
    assert parse_tool_calls('<tool_call>\n{"name": "no_args"}\n</tool_call>').tool_calls[0].arguments == "{}"


def test_malformed_blocks_fall_back_to_content() -> None:
    text = "<tool_call>\nnot json</tool_call> and text"
    r = parse_tool_calls(text)
    assert r.tool_calls == [] and r.content == text
    truncated = parse_tool_calls('<tool_call>\n{"name": "trunc')
    assert truncated.tool_calls == [] and truncated.content == '<tool_call>\n{"name": "trunc'


def test_tags_never_leak_while_streaming() -> None:
    text = "Sure.\n" + WEATHER + "\n" + call("b", {})
    for cuts in ([], list(range(1, len(text))), [3, 8, 9, 10, 20, 40, 41, 60]):
        content, calls, deltas = assemble(text, cuts)
        assert content == "Sure."
        assert len(calls) == 2
        for d in deltas:
            assert "<" not in d and "tool_call" not in d


def test_arguments_stream_before_the_call_ends() -> None:
    parser = HermesToolParser(id_factory=ids())
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Pa')
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "get_weather", '{"location": "Pa')]
    more = parser.feed('ris"}}\n</tool')
    assert [(c.index, c.name, c.arguments) for c in more.tool_calls] == [(0, None, 'ris"}')]
    end = parser.feed("_call>")
    assert not end and parser.finish().content == ""


def test_parallel_tool_calls_false_keeps_first() -> None:
    text = WEATHER + "\n" + call("second", {})
    r = parse_tool_calls(text, parallel_tool_calls=False)
    assert [c.name for c in r.tool_calls] == ["get_weather"]
    for cuts in ([], list(range(1, len(text)))):
        content, calls, _ = assemble(text, cuts, parallel_tool_calls=False)
        assert [c.name for c in calls] == ["get_weather"] and content is None


BARE_CASES = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\nDone.',
    '  {"name": "unknown_tool", "arguments": {}}',
    '```python\nprint({"name": 1})\n```',
    '{"city": "Paris"}',
    '{"name": "get_weather", "arguments": {"city": "Par',
    '```json\n{"name": "get_weather"}',
    "Plain answer, no call.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
]


@pytest.mark.parametrize("text", BARE_CASES)
def test_bare_json_calls_streamed_equals_non_streamed(text: str) -> None:
    ref = parse_tool_calls(text, id_factory=ids(), tool_names=["get_weather"])
    for cuts in ([], list(range(1, len(text))), [1, 2, 3, 5, 8, 13, 21, 34]):
        cuts = [c for c in cuts if c < len(text)]
        content, calls, _ = assemble(text, cuts, tool_names=["get_weather"])
        assert (content, calls) == (ref.content, ref.tool_calls), cuts


def test_bare_json_call_values() -> None:
    fenced = parse_tool_calls(BARE_CASES[1], tool_names=["get_weather"])
    assert fenced.content is None and [c.name for c in fenced.tool_calls] == ["get_weather"]
    assert json.loads(fenced.tool_calls[0].arguments) == {"city": "Paris"}
    after = parse_tool_calls(BARE_CASES[2], tool_names=["get_weather"])
    assert after.content == "\nDone." and len(after.tool_calls) == 1
    for text in BARE_CASES[3:7]:  # wrong name, not a call, truncated: the text comes back as is
        r = parse_tool_calls(text, tool_names=["get_weather"])
        assert r.tool_calls == [] and r.content == text, text
    assert parse_tool_calls(BARE_CASES[0]).tool_calls == []  # only with the request's tool names
