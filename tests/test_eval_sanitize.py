"""Completion post-processing: the maker's protocol cut + evalplus-style sanitizer."""
from __future__ import annotations

from qwenkit.eval.protocols import PROTOCOLS, QWEN_STOP, get_protocol
from qwenkit.eval.sanitize import extract_code, extract_fenced_code, sanitize


def test_extract_code_finds_the_longest_parsable_block():
    text = "Here is the solution:\n\ndef f(x):\n    return x + 1\n\nThis adds one.\n"
    assert extract_code(text).strip() == "def f(x):\n    return x + 1"


def test_sanitize_keeps_imports_and_reachable_definitions_only():
    code = (
        "import math\n"
        "from typing import List\n"
        "def helper(x):\n    return math.sqrt(x)\n"
        "def unused(y):\n    return y\n"
        "LIMIT = 10\n"
        "def solve(xs: List[int]) -> float:\n    return sum(helper(x) for x in xs[:LIMIT])\n"
        "print(solve([4, 9]))\n"
        "assert solve([4]) == 2\n"
    )
    out = sanitize(code, "solve")
    assert "import math" in out and "from typing import List" in out
    assert "def helper" in out and "LIMIT = 10" in out and "def solve" in out
    assert "def unused" not in out and "print(" not in out and "assert" not in out
    ns: dict = {}
    exec(out, ns)
    assert ns["solve"]([4, 9]) == 5.0


def test_sanitize_drops_functions_without_return_and_decorated_ones():
    # evalplus quirks (tree-sitter: no return statement / decorated_definition)
    code = "def f():\n    pass\n@staticmethod\ndef g():\n    return 1\ndef h():\n    return 2\n"
    assert sanitize(code) == "def h():\n    return 2"


def test_sanitize_keeps_the_first_definition_of_a_name():
    code = "def f():\n    return 1\ndef f():\n    return 2\n"
    assert sanitize(code, "f") == "def f():\n    return 1"


def test_sanitize_classes_and_methods():
    code = "class Solver:\n    def run(self):\n        return 3\ndef solve():\n    return Solver().run()\n"
    out = sanitize(code, "solve")
    assert "class Solver" in out and "def solve" in out


def test_qwen_protocol_prompt_is_the_makers_chatml():
    p = get_protocol("qwen")
    prompt = p.prompt("\ndef f(x):\n    '''doc'''\n", tokenizer=None)
    assert prompt == (
        "<|im_start|>system\nYou are an intelligent programming assistant to produce Python algorithmic "
        "solutions<|im_end|>\n<|im_start|>user\nCan you complete the following Python function?\n"
        "```python\ndef f(x):\n    '''doc'''\n```\n<|im_end|>\n<|im_start|>assistant\n```python\n"
    )
    assert "\n```" in p.stop and list(p.stop) == QWEN_STOP
    assert p.max_tokens == 2048
    assert p.max_new_tokens(100) == 1436  # vLLM max_model_len 1536 in the maker's script


def test_qwen_postprocess_tabs_fence_and_sanitize():
    completion = "def f(x):\n\tif x:\n\t\treturn 1\n\treturn 0\n```\nprint(f(1))"
    out = PROTOCOLS["qwen"].postprocess(completion, "f")
    assert out == "def f(x):\n    if x:\n        return 1\n    return 0"


def test_chat_template_postprocess_extracts_fenced_block():
    answer = "Sure! Here it is:\n```python\ndef f(x):\n    return x * 2\n```\nIt doubles x."
    assert PROTOCOLS["chat-template"].postprocess(answer, "f") == "def f(x):\n    return x * 2"
    assert extract_fenced_code("no code") == "no code"
