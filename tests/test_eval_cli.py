"""`qwenkit eval ...` argument parsing (the real-model runs are not part of the unit tests)."""
from __future__ import annotations

import argparse

import pytest

from qwenkit.eval.cli import add_eval_parser


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="qwenkit")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_humaneval_defaults_are_the_makers_protocol(parser):
    a = parser.parse_args(["eval", "humaneval", "qwen2.5-coder-0.5b-instruct", "--limit", "5"])
    assert a.benchmark == "humaneval" and a.protocol == "qwen" and a.limit == 5
    assert a.temperature == 0.0 and a.n == 1
    assert a.func.__name__ == "cmd_codegen"


def test_mbpp_and_chat_template(parser):
    a = parser.parse_args(["eval", "mbpp", "m", "--protocol", "chat-template", "--mbpp-path", "/x.jsonl", "-o", "r.json"])
    assert a.benchmark == "mbpp" and a.protocol == "chat-template" and a.mbpp_path == "/x.jsonl"
    assert a.output == "r.json"


def test_ppl(parser):
    a = parser.parse_args(["eval", "ppl", "m", "--text", "f.txt", "--ctx", "256"])
    assert a.ctx == 256 and a.text == "f.txt" and a.func.__name__ == "cmd_ppl"


def test_quantization_flag_and_eval_quant(parser):
    a = parser.parse_args(["eval", "humaneval", "m"])
    assert a.quantization == "auto"  # the default runtime format, as `generate` / `serve`
    a = parser.parse_args(["eval", "humaneval", "m", "-q", "none"])
    assert a.quantization == "none"
    a = parser.parse_args(["eval", "quant", "m", "--methods", "int8;int8@decode", "--chunks", "2"])
    assert a.methods == ["int8", "int8@decode"] and a.chunks == 2
    assert a.func.__name__ == "cmd_eval_quant"


def test_ppl_stride_and_passkey(parser):
    a = parser.parse_args(["eval", "ppl", "m", "--text", "f.txt", "--ctx", "8192", "--stride", "4096"])
    assert a.stride == 4096
    a = parser.parse_args(["eval", "passkey", "m", "--lengths", "4k,8k", "--num-samples", "2",
                           "--streaming-window", "2048", "--engine-arg", 'rope_scaling={"factor": 4}'])
    assert a.func.__name__ == "cmd_passkey" and a.num_samples == 2
    from qwenkit.eval.cli import _engine_kwargs

    assert _engine_kwargs(a) == {"streaming_window": 2048, "rope_scaling": {"factor": 4}}
