"""Chat templates rendered by qwenkit == transformers' apply_chat_template; FIM prompts."""
from __future__ import annotations

import copy
import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import jinja2
import pytest

from qwenkit.tokenizer import ChatTemplate, Tokenizer, fim_prompt, get_json_schema, repo_fim_prompt, repo_prompt
from tests.test_tokenizer import control_base, load_ours_dir, load_ours_gguf, load_ref_dir, load_ref_gguf


@pytest.fixture(scope="module")
def ours(qwen_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer (Qwen2.5's chat template), and (slow) the real one."""
    return load_ours_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def ref_dir(qwen_tokenizer_dir: Path) -> Any:
    return load_ref_dir(qwen_tokenizer_dir)


# ----------------------------------------------------------------------------- golden set
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "搜索文档 — full-text search with <html> & \"quotes\"",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer", "default": 5, "minimum": 1},
                "filters": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["query"],
        },
    },
}
RUN_CODE = {
    "type": "function",
    "function": {
        "name": "run_python",
        "description": "Execute Python code and return stdout.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}

USER = {"role": "user", "content": "What's the weather like in Boston today?"}
CALL_DICT = {
    "role": "assistant",
    "content": None,  # OpenAI style: dropped before rendering
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": {"location": "Boston, MA", "unit": "celsius"}},
        }
    ],
}
CALL_STR = {
    "role": "assistant",
    "tool_calls": [
        {
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "Boston, MA"}'},
        }
    ],
}

GOLDEN: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = [
    ("single_user", [{"role": "user", "content": "Hello!"}], None, True),
    ("single_user_no_prompt", [{"role": "user", "content": "Hello!"}], None, False),
    (
        "system_user",
        [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "2+2?"}],
        None,
        True,
    ),
    (
        "multi_turn",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write hello world in C."},
            {"role": "assistant", "content": "```c\n#include <stdio.h>\nint main(){puts(\"hi\");}\n```"},
            {"role": "user", "content": "Now in Rust."},
            {"role": "assistant", "content": "fn main() { println!(\"hi\"); }"},
        ],
        None,
        False,
    ),
    ("tools_no_system", [USER], [WEATHER, SEARCH, RUN_CODE], True),
    ("tools_with_system", [{"role": "system", "content": "You can call tools."}, USER], [WEATHER, SEARCH], True),
    (
        "tool_call_dict_args",
        [USER, CALL_DICT, {"role": "tool", "name": "get_current_weather", "content": '{"temp": 22, "unit": "celsius"}'}],
        [WEATHER],
        True,
    ),
    (
        "tool_call_str_args",
        [USER, CALL_STR, {"role": "tool", "content": "22 degrees"}, {"role": "assistant", "content": "It is 22°C."}],
        [WEATHER],
        False,
    ),
    (
        "parallel_calls_consecutive_tool_responses",
        [
            {"role": "user", "content": "Weather in Paris, Tokyo and 北京?"},
            {
                "role": "assistant",
                "content": "Let me check all three.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_current_weather", "arguments": {"location": c}}}
                    for c in ("Paris", "Tokyo", "北京")
                ],
            },
            {"role": "tool", "content": "18C"},
            {"role": "tool", "content": "25C"},
            {"role": "tool", "content": "30C ☀️"},
        ],
        [WEATHER, SEARCH],
        True,
    ),
    (
        "bare_tool_call_objects",  # tool calls without the "function" wrapper
        [USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "search_docs", "arguments": {"query": "q"}}]}],
        [SEARCH],
        True,
    ),
    (
        "non_ascii",
        [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "用中文解释 “递归” 😀👨‍👩‍👧 — café, naïve"},
            {"role": "assistant", "content": "递归是函数调用自身。"},
            {"role": "user", "content": "Ещё пример? <tool_call> written by the user <|im_end|>"},
        ],
        None,
        True,
    ),
    (
        "system_mid_conversation",
        [USER, {"role": "assistant", "content": "Sunny."}, {"role": "system", "content": "Be formal."}, USER],
        None,
        True,
    ),
    ("empty_tools_list", [USER], [], True),
    (
        "tool_after_user_then_more_turns",
        [
            {"role": "system", "content": "sys"},
            USER,
            CALL_DICT,
            {"role": "tool", "content": "{\"ok\": true}"},
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER, RUN_CODE],
        True,
    ),
]
GOLDEN_IDS = [g[0] for g in GOLDEN]


def _ref_render(ref: Any, messages: Any, tools: Any, agp: bool, **kw: Any) -> str:
    return ref.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), add_generation_prompt=agp, tokenize=False, **kw)


@pytest.mark.parametrize("name,messages,tools,agp", GOLDEN, ids=GOLDEN_IDS)
def test_golden_vs_transformers_hf_dir(ours: Tokenizer, ref_dir: Any, name: str, messages: Any, tools: Any, agp: bool) -> None:
    """Template from the same HF folder, rendered by transformers, equals our rendering."""
    before = copy.deepcopy(messages)
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=agp)
    assert messages == before  # the caller's messages are not modified
    assert got == _ref_render(ref_dir, messages, tools, agp)
    ids = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=agp, tokenize=True)
    want = ref_dir.apply_chat_template(
        copy.deepcopy(messages), tools=copy.deepcopy(tools), add_generation_prompt=agp, tokenize=True, return_dict=False
    )
    assert ids == list(want)


@pytest.mark.slow
def test_golden_vs_transformers_gguf(gguf_05b_path: Path) -> None:
    ours_g = load_ours_gguf(gguf_05b_path)
    ref = load_ref_gguf(gguf_05b_path)
    assert ours_g.chat_template == ref.chat_template
    for name, messages, tools, agp in GOLDEN:
        assert ours_g.apply_chat_template(messages, tools=tools, add_generation_prompt=agp) == _ref_render(
            ref, messages, tools, agp
        ), name


def test_golden_shape(ours: Tokenizer) -> None:
    """Spot-check the Qwen format itself (independent of transformers)."""
    s = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert s == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    s = ours.apply_chat_template([USER, CALL_DICT], tools=[WEATHER], add_generation_prompt=False)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in s
    assert '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston, MA", "unit": "celsius"}}\n</tool_call><|im_end|>' in s
    s = ours.apply_chat_template([USER, CALL_STR], tools=[WEATHER], add_generation_prompt=False)
    assert '"arguments": "{\\"location\\": \\"Boston, MA\\"}"}' in s  # strings are JSON-encoded again, like HF


def test_continue_final_message(ours: Tokenizer, ref_dir: Any) -> None:
    msgs = [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2,"}]
    got = ours.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert got.endswith("<|im_start|>assistant\n1, 2,")
    assert got == ref_dir.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    with pytest.raises(ValueError):
        ours.apply_chat_template(msgs, add_generation_prompt=True, continue_final_message=True)


class Unit(Enum):
    C = "celsius"
    F = "fahrenheit"


def test_tools_as_python_functions(ours: Tokenizer, ref_dir: Any) -> None:
    from transformers.utils import get_json_schema as hf_schema

    def get_temperature(location: str, unit: Unit = Unit.C, days: Optional[int] = None) -> float:
        """Get the temperature at a location.

        Args:
            location: The location, e.g. "Paris, France".
            unit: The unit to return.
            days: How many days ahead,
                zero for today.

        Returns:
            The temperature.
        """
        return 0.0

    def pick(mode: Literal["a", "b"], tags: list[str], weights: dict[str, float], pair: tuple[int, str], x: int | str) -> None:
        """Pick something.

        Args:
            mode: The mode.
            tags: Some tags.
            weights: Per-tag weights.
            pair: A pair.
            x: An int or a string (choices: [1, "two"])
        """

    for fn in (get_temperature, pick):
        assert get_json_schema(fn) == hf_schema(fn)
    msgs = [{"role": "user", "content": "temp?"}]
    assert ours.apply_chat_template(msgs, tools=[get_temperature, WEATHER]) == _ref_render(
        ref_dir, msgs, [get_temperature, WEATHER], True
    )

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ValueError):
        get_json_schema(undocumented)
    with pytest.raises(ValueError):
        ours.apply_chat_template(msgs, tools=[42])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- Jinja semantics
SEMANTIC_TEMPLATES = {
    "tojson_options": "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true, separators=(',', ':')) }}|{{ '<&>' | tojson }}",
    "trim_lstrip": "{% for m in messages %}\n    {% if m.role == 'user' %}\n  [{{ m.content }}]\n    {% endif %}\n{% endfor %}\n",
    "loopcontrols": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{% if loop.index0 == 3 %}{% break %}{% endif %}{{ m.role }};{% endfor %}",
    "namespace_and_dict": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ dict(a=1, b=ns.n) | tojson }}{{ dict.fromkeys(['x']) | tojson }}",
    "special_tokens_vars": "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ custom_var | default('none') }}|{{ add_generation_prompt }}",
    "generation_block": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}<{{ m.content }}>{% endif %}{% endfor %}",
    "strftime": "{{ strftime_now('%Y') }}",
    "tools_and_documents": "{{ tools | tojson }}{{ documents | tojson }}",
    "none_dropped": "{% for m in messages %}{{ 'content' in m }},{% endfor %}",
}
SEM_MESSAGES = [
    {"role": "system", "content": "sys ü"},
    {"role": "user", "content": "hi <b>\"there\"</b> 中文"},
    {"role": "assistant", "content": "ok", "extra": None},
    {"role": "user", "content": None},
    {"role": "assistant", "content": "bye"},
]


@pytest.mark.parametrize("name", list(SEMANTIC_TEMPLATES))
def test_jinja_semantics_vs_transformers(ours: Tokenizer, ref_dir: Any, name: str) -> None:
    src = SEMANTIC_TEMPLATES[name]
    kw: dict[str, Any] = {"chat_template": src}
    if name == "tools_and_documents":
        kw["documents"] = [{"title": "t", "text": "x"}]
    if name == "special_tokens_vars":
        kw["custom_var"] = "CUSTOM"
    got = ours.apply_chat_template(SEM_MESSAGES, tools=[WEATHER], add_generation_prompt=False, **kw)
    want = ref_dir.apply_chat_template(copy.deepcopy(SEM_MESSAGES), tools=[WEATHER], add_generation_prompt=False, tokenize=False, **kw)
    assert got == want


def test_raise_exception_and_sandbox() -> None:
    t = ChatTemplate("{% if messages | length > 1 %}{{ raise_exception('only one message') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(jinja2.TemplateError, match="only one message"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "a"}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable sandbox
        ChatTemplate("{% set x = [] %}{{ x.append(1) }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError):
        ChatTemplate("{% if %}")
    with pytest.raises(ValueError):
        ChatTemplate("")
    with pytest.raises(ValueError):
        ChatTemplate("x").render("not a list")  # type: ignore[arg-type]


def test_generation_spans() -> None:
    t = ChatTemplate(SEMANTIC_TEMPLATES["generation_block"])
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    text, spans = t.render_with_spans(msgs)
    assert text == t.render(msgs) == "<q>answer<q2>a2"
    assert [text[a:b] for a, b in spans] == ["answer", "a2"]


def test_dataclass_messages(ours: Tokenizer) -> None:
    import dataclasses

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str

    assert ours.apply_chat_template([Msg("user", "hi")]) == ours.apply_chat_template([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------- FIM
def test_fim_prompt_ids(ours: Tokenizer) -> None:
    p = fim_prompt("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n")
    assert p == "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))\n<|fim_middle|>"
    prefix, middle, suffix = (control_base(ours) + k for k in (16, 17, 18))  # 151659, 151660, 151661
    ids = ours.encode(p)
    assert ids[0] == prefix and ids[-1] == middle
    assert ids.count(suffix) == 1
    suffix_at = ids.index(suffix)
    assert ours.decode(ids[1:suffix_at]) == "def add(a, b):\n    "
    assert ours.encode(fim_prompt("", "")) == [prefix, suffix, middle]
    with pytest.raises(ValueError):
        fim_prompt("x<|fim_middle|>", "")
    with pytest.raises(ValueError):
        fim_prompt(1, "")  # type: ignore[arg-type]


def test_repo_fim_prompt_ids(ours: Tokenizer) -> None:
    files = [("lib/util.py", "def helper():\n    return 1\n"), ("README.md", "# Demo\n")]
    p = repo_fim_prompt("acme/demo", files, "from lib.util import helper\n\nx = ", "\nprint(x)\n", "main.py")
    assert p == (
        "<|repo_name|>acme/demo\n"
        "<|file_sep|>lib/util.py\ndef helper():\n    return 1\n\n"
        "<|file_sep|>README.md\n# Demo\n\n"
        "<|file_sep|>main.py\n"
        "<|fim_prefix|>from lib.util import helper\n\nx = <|fim_suffix|>\nprint(x)\n<|fim_middle|>"
    )
    base = control_base(ours)
    repo, sep = base + 20, base + 21  # 151663, 151664
    ids = ours.encode(p)
    assert ids[0] == repo
    assert ids.count(sep) == 3
    assert [i for i in ids if i >= base] == [repo, sep, sep, sep, base + 16, base + 18, base + 17]
    assert ours.decode(ids) == p
    assert repo_prompt("acme/demo", files) == p[: p.index("<|file_sep|>main.py")]
    with pytest.raises(ValueError):
        repo_fim_prompt("a\nb", [], "", "", "x.py")
    with pytest.raises(ValueError):
        repo_fim_prompt("r", [("a.py",)], "", "", "x.py")  # type: ignore[list-item]
