"""Passkey retrieval (`qwenkit.eval.passkey`, `qwenkit eval passkey`): exact prompt lengths in the
model's tokens, key placement by depth, regex scoring, the report; the real 0.5B must pass."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenkit.eval.passkey import (
    GARBAGE, NEEDLE, QUESTION, TASK, build_prompt, parse_depths, parse_length, run_passkey, score,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("length", [160, 257, 480])
def test_prompt_has_exact_length_and_key_at_depth(tiny_tokenizer, length):
    tok = tiny_tokenizer
    head, tail, unit = tok.encode(TASK), tok.encode(QUESTION), tok.encode(GARBAGE)
    needle = tok.encode(NEEDLE.format(key="40417"))
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ids, pos = build_prompt(tok, length, depth, "40417")
        assert len(ids) == length
        assert ids[:len(head)] == head and ids[-len(tail):] == tail
        assert ids[pos:pos + len(needle)] == needle  # the key sentence, whole, where reported
        n_garbage = length - len(head) - len(needle) - len(tail)
        assert (pos - len(head)) % len(unit) == 0 or pos - len(head) == n_garbage  # a unit boundary or the end
        assert abs((pos - len(head)) - depth * n_garbage) <= len(unit) / 2 + 1
        positions.append(pos)
    assert positions[0] == len(head)  # depth 0: right after the description
    assert positions[-1] == length - len(tail) - len(needle)  # depth 1: right before the question
    assert positions == sorted(positions)
    text = tok.decode(build_prompt(tok, length, 0.5, "40417")[0])
    assert text.count("40417") == 2 and text.startswith(TASK) and text.endswith(QUESTION)


def test_too_short_length_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="passkey length 20 is too short"):
        build_prompt(tiny_tokenizer, 20, 0.5, "12345")


def test_parse_lengths_depths_and_score():
    assert [parse_length(x) for x in ("4k", "8K", "1500", "0.5k")] == [4096, 8192, 1500, 512]
    with pytest.raises(ValueError, match="--lengths"):
        parse_length("four")
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="outside"):
        parse_depths("0,1.5")
    assert score(" 40417. Remember", "40417")
    assert not score(" 4041", "40417") and not score(" 404170", "40417") and not score(" no digits", "40417")
    assert not score(" 1, then 40417", "40417")  # the first number counts


class _EchoLLM:
    """Answers the key read from the prompt when it lies in the prompt's first half, else a wrong number."""

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            self.prompts.append(ids)
            text = self.tok.decode(ids)
            key = text.split("The pass key is ")[1][:5]
            pos = text.index("The pass key is ") / len(text)
            answer = f" {key}." if pos < 0.5 else " 11111."
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=answer)]))
        return outs


def test_run_passkey_scores_and_reports(tiny_tokenizer):
    llm = _EchoLLM(tiny_tokenizer)
    res = run_passkey(llm, [300, 400], [0.0, 1.0], num_samples=3, seed=7, use_tqdm=False)
    assert len(llm.prompts) == 2 * 2 * 3 and sorted(map(len, llm.prompts)) == [300] * 6 + [400] * 6
    assert len({s.key for s in res.samples}) > 1  # random keys per sample
    assert res.accuracy(depth=0.0) == 1.0 and res.accuracy(depth=1.0) == 0.0 and res.accuracy() == 0.5
    table = res.table()
    assert "overall: 50.0% of 12 samples" in table
    js = res.to_json()
    assert js["by_length_depth"] == {"300@0.0": 1.0, "300@1.0": 0.0, "400@0.0": 1.0, "400@1.0": 0.0}
    # the same seed gives the same keys
    assert [s.key for s in run_passkey(llm, [300, 400], [0.0, 1.0], 3, seed=7, use_tqdm=False).samples] == [
        s.key for s in res.samples]


def _cli(args, capsys):
    """`qwenkit ARGS` in this process (no interpreter start-up): (exit code, stdout)."""
    from qwenkit.cli.main import main

    rc = main(args)
    return rc, capsys.readouterr().out


def test_cli_passkey_on_tiny_model_matches_naive_greedy(tiny_hf_dir: Path, tmp_path: Path, capsys):
    """End to end through the engine with engine options passed through; each continuation is the
    plain model's full-recompute greedy (the oracle of tests/engine_helpers)."""
    import torch

    from qwenkit.loaders.load import load
    from tests.engine_helpers import naive_greedy

    out = tmp_path / "pk.json"
    rc, stdout = _cli(["eval", "passkey", str(tiny_hf_dir), "--lengths", "160,200", "--depths", "0,1", "--max-tokens", "4",
              "-q", "none", "--no-progress", "--threads", "1", "--max-num-batched-tokens", "64", "--engine-arg", "block_size=8",
              "-o", str(out)], capsys)  # fmt: skip
    assert rc == 0
    assert "overall:" in stdout and "depth \\ length" in stdout
    js = json.loads(out.read_text())
    assert js["engine_args"] == {"max_num_batched_tokens": 64, "block_size": 8, "max_model_len": 204}
    assert len(js["samples"]) == 4 and js["lengths"] == [160, 200]
    lm = load(tiny_hf_dir, dtype=torch.float32, quantization="none")
    s = js["samples"][3]
    ids, pos = build_prompt(lm.tokenizer, s["length"], s["depth"], s["key"])
    assert pos == s["needle_position"]
    want = lm.tokenizer.decode(naive_greedy(lm.model, ids, 4), skip_special_tokens=True)
    assert s["output"] == want and s["passed"] == score(want, s["key"])


def test_cli_bad_engine_arg_is_a_clear_error(tiny_hf_dir: Path, capsys, caplog):
    rc, _ = _cli(["eval", "passkey", str(tiny_hf_dir), "--lengths", "160", "--engine-arg", "no_such_option=1",
                  "--no-progress", "-q", "none", "--threads", "1"], capsys)  # fmt: skip
    assert rc == 2 and "no_such_option" in caplog.text


@pytest.mark.slow
def test_real_05b_finds_the_key_within_its_window(gguf_05b_path):
    """Plain attention, 2K tokens (well inside the 32K trained window), 3 depths: all pass."""
    from qwenkit.eval.passkey import passkey

    res = passkey(str(gguf_05b_path), lengths=[2048], depths=[0.0, 0.5, 1.0], seed=1, use_tqdm=False)
    assert [s.passed for s in res.samples] == [True] * 3, [s.output for s in res.samples]
