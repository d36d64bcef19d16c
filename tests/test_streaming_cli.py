"""Sliding window + attention sinks (StreamingLLM) from the CLI, the Python API and the server: the
flags reach the engine, a generation runs far past the KV cache's capacity and --max-model-len,
and the KV blocks held stay bounded by sinks + window (+ one step's chunk)."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from tests.serve_utils import wait_ready

BLOCK = 8
PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny_hf_dir: layers x (k, v) x kv heads x head_dim x fp32 bytes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(args, capsys, monkeypatch, stdin=""):
    """`qwenkit ARGS` in this process (no interpreter start-up): (exit code, stdout)."""
    from qwenkit.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(args)
    return rc, capsys.readouterr().out


def test_generate_cli_streams_past_the_cache_and_max_model_len(tiny_hf_dir: Path, capsys, monkeypatch):
    base = ["generate", "-m", str(tiny_hf_dir), "Hello there", "-t", "0", "-n", "150", "--ignore-eos", "--json",
            "--block-size", str(BLOCK), "--kv-cache-memory", str(96 * PER_TOKEN), "--max-model-len", "64",
            "--max-num-seqs", "1", "--max-num-batched-tokens", "16"]  # fmt: skip
    rc, stdout = _cli(base, capsys, monkeypatch)
    assert rc == 0
    p = json.loads(stdout.strip().splitlines()[-1])
    assert p["finish_reason"] == "length" and p["usage"]["total_tokens"] == 64  # capped by --max-model-len
    rc, stdout = _cli(base + ["--streaming-window", "32", "--num-sink-tokens", "4"], capsys, monkeypatch)
    assert rc == 0
    out = json.loads(stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 150 and out["usage"]["total_tokens"] > 96  # past the cache's capacity
    assert out["token_ids"][:20] == p["token_ids"][:20]  # same tokens while nothing left the window


def test_chat_cli_endless_conversation(tiny_hf_dir: Path, capsys, monkeypatch, caplog):
    """Each turn resubmits the history; with the window it may outgrow --max-model-len."""
    args = ["chat", "-m", str(tiny_hf_dir), "-t", "0", "-n", "24", "--ignore-eos", "--max-model-len", "64",
            "--system", "Be brief."]  # fmt: skip
    stdin = "hello\nsecond question\nthird one\n/exit\n"
    rc, stdout = _cli(args, capsys, monkeypatch, stdin)
    assert rc == 2 and "max_model_len" in caplog.text and 2 <= stdout.count(">>> ") < 4  # a later turn no longer fits
    rc, stdout = _cli(args + ["--streaming-window", "48", "--num-sink-tokens", "4"], capsys, monkeypatch, stdin)
    assert rc == 0 and stdout.count(">>> ") == 4


def _used_blocks(llm) -> int:
    bm = llm.llm_engine.block_manager
    return bm.num_blocks - bm.num_free_blocks


def test_llm_api_kv_blocks_stay_bounded():
    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams
    from tests.engine_helpers import tiny_model

    model = tiny_model(seed=3)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompt = list(range(10, 30))
    window, sinks, chunk = 16, 4, 16

    def run(**kw):
        llm = LLM(model, block_size=BLOCK, max_num_seqs=1, max_num_batched_tokens=chunk, **kw)
        used, n = [], 0
        for out in llm.stream(prompt, params):
            n += len(out.outputs[0].token_ids)
            used.append(_used_blocks(llm))
        assert _used_blocks(llm) == 0  # every block back in the pool at the end
        return n, max(used)

    n, peak = run(streaming_window=window, num_sink_tokens=sinks, max_model_len=64)
    bound = -(-sinks // BLOCK) + (window + chunk) // BLOCK + 2  # sink blocks + window + chunk + partial blocks
    assert n == 120 and peak <= bound, (peak, bound)
    n_full, peak_full = run(max_model_len=512)  # without the window the cache grows with the sequence
    assert n_full == 120 and peak_full >= (len(prompt) + 120 - 1) // BLOCK > 2 * bound


def test_serve_flags_reach_the_engine(tiny_hf_dir: Path):
    """`qwenkit serve --streaming-window`: a 150-token completion from a 96-token cache."""
    import argparse

    from fastapi.testclient import TestClient

    from qwenkit.serve.app import create_app
    from qwenkit.serve.cli import add_serve_parser, settings_from_args
    from qwenkit.serve.engine_client import load_engine_client

    parser = argparse.ArgumentParser(prog="qwenkit")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", str(tiny_hf_dir), "--streaming-window", "32", "--num-sink-tokens", "4",
                              "--block-size", str(BLOCK), "--max-num-batched-tokens", "16", "--max-num-seqs", "1",
                              "--kv-cache-memory", str(96 * PER_TOKEN), "--max-model-len", "512"])  # fmt: skip
    s = settings_from_args(args)
    assert s.engine_args["streaming_window"] == 32 and s.engine_args["num_sink_tokens"] == 4
    engines = []

    def factory():
        engines.append(load_engine_client(s.model, quantization="none", max_num_seqs=s.max_num_seqs, **s.engine_args))
        return engines[-1]

    with TestClient(create_app(s, factory)) as c:
        wait_ready(c)
        assert engines, "the engine did not load"
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 150, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 150
    core = engines[0].core
    assert core.streaming and core.kv_cache.num_slots == 96  # 150+ tokens through a 96-token cache


@pytest.mark.parametrize("flag", ["--streaming-window", "--num-sink-tokens"])
def test_bad_values_are_clear_errors(tiny_hf_dir: Path, flag: str, caplog):
    from qwenkit.cli.main import main

    rc = main(["generate", "-m", str(tiny_hf_dir), "hi", "-n", "2", "--streaming-window", "32", flag, "-1"])
    assert rc == 2 and flag.lstrip("-").replace("-", "_") + " must be" in caplog.text
