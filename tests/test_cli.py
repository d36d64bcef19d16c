"""The `qwenkit` CLI end to end (subprocesses), on a tiny random model with the tiny tokenizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(args: list[str], stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWENKIT_LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "qwenkit.cli.main", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_generate_json_is_consistent(tiny_hf_dir: Path) -> None:
    from qwenkit.tokenizer import Tokenizer

    r = _run(["generate", "-m", str(tiny_hf_dir), "Hello", "-t", "0", "-n", "12", "--ignore-eos", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "length"
    assert len(out["token_ids"]) == 12
    tok = Tokenizer.from_hf_dir(tiny_hf_dir)
    n = len(tok.encode("Hello"))
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 12, "total_tokens": n + 12}
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_generate_seed_reproducible_and_streams(tiny_hf_dir: Path) -> None:
    args = ["generate", "-m", str(tiny_hf_dir), "def f(x):", "-t", "1.0", "--seed", "3", "-n", "10", "--ignore-eos"]
    a, b = _run(args), _run(args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_chat_multi_turn_and_reset(tiny_hf_dir: Path) -> None:
    r = _run(["chat", "-m", str(tiny_hf_dir), "-t", "0", "-n", "5"], stdin="hello\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(history cleared)" in r.stdout
    assert r.stdout.count(">>> ") == 4  # two questions, /reset, /exit


def test_unknown_model_is_a_clear_error() -> None:
    r = _run(["generate", "-m", "no-such-model-xyz", "hi"])
    assert r.returncode == 2
    assert "qwen2.5-coder-0.5b-instruct" in r.stderr  # lists the registry names
    assert "Traceback" not in r.stderr


def test_truncated_model_file_is_a_clear_error(tmp_path: Path, tiny_hf_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_hf_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    r = _run(["generate", "-m", str(bad), "hi"])
    assert r.returncode == 2
    assert "model.safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_real_model_greedy(gguf_05b_path: Path) -> None:
    r = _run(["generate", "-m", str(gguf_05b_path), "--chat", "What is 2+3? Answer with one number.",
              "-t", "0", "-n", "8", "--json"], timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "5" in out["text"]
    assert out["finish_reason"] in ("stop", "length")


def test_generate_batch_jsonl(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from qwenkit.tokenizer import Tokenizer

    ids = Tokenizer.from_hf_dir(tiny_hf_dir).encode("Hello world")
    inp = tmp_path / "in.jsonl"
    lines = [{"id": "a", "prompt": "Hello"}, {"id": "b", "messages": [{"role": "user", "content": "hi"}]},
             {"id": "c", "prompt_token_ids": ids}]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run(["generate", "-m", str(tiny_hf_dir), "--input", str(inp), "--output", str(out),
              "-t", "0", "-n", "6", "--ignore-eos"])
    assert r.returncode == 0, r.stderr
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in res] == ["a", "b", "c"]
    assert all(len(x["token_ids"]) == 6 and x["finish_reason"] == "length" for x in res)
    assert res[2]["usage"]["prompt_tokens"] == len(ids)
    # The streamed single-prompt path and the batched path agree.
    single = _run(["generate", "-m", str(tiny_hf_dir), "Hello", "-t", "0", "-n", "6", "--ignore-eos", "--json"])
    assert json.loads(single.stdout.strip().splitlines()[-1])["token_ids"] == res[0]["token_ids"]
