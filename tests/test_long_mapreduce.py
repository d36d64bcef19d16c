"""`qwenkit.long.map_reduce` and `qwenkit summarize`: token-boundary segments with exact overlaps
that cover the text, one engine batch per level, hierarchical reduce within the segment budget."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenkit.long import map_reduce, split_segments
from qwenkit.long.map_reduce import MAP_PROMPT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n,segment,overlap", [(1, 8, 2), (8, 8, 2), (9, 8, 2), (100, 8, 2), (100, 10, 0),
                                               (1000, 64, 63), (4096, 1024, 256), (5000, 1024, 256)])  # fmt: skip
def test_segments_cover_with_exact_overlaps(n, segment, overlap):
    spans = split_segments(n, segment, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    covered = set()
    for a, b in spans:
        assert 0 < b - a <= segment
        covered.update(range(a, b))
    assert covered == set(range(n))
    for (a0, b0), (a1, b1) in zip(spans, spans[1:-1]):  # all but the last: fixed step, exact overlap
        assert a1 - a0 == segment - overlap and b0 - a1 == overlap
    if len(spans) > 1:  # the last segment ends the text and overlaps at least `overlap`
        assert spans[-2][1] - spans[-1][0] >= overlap and spans[-1][0] > spans[-2][0]
    assert len(spans) == (1 if n <= segment else -(-(n - segment) // (segment - overlap)) + 1)


def test_bad_segment_arguments():
    with pytest.raises(ValueError, match="overlap"):
        split_segments(100, 8, 8)
    with pytest.raises(ValueError, match="segment"):
        split_segments(100, 0, 0)


class _FakeLLM:
    """Answers every prompt with `words` words naming the prompt; records the batches."""

    def __init__(self, tok, words=3):
        self.tok, self.words, self.batches = tok, words, []

    def get_tokenizer(self):
        return self.tok

    def chat(self, conversations, params=None, use_tqdm=True):
        prompts = [c[0]["content"] for c in conversations]
        self.batches.append(prompts)
        k = len(self.batches)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=" ".join([f"b{k}p{i}"] * self.words))])
                for i in range(len(prompts))]  # fmt: skip


def _text(tok, n_tokens):
    words = " ".join(f"word{i}" for i in range(n_tokens))
    ids = tok.encode(words)[:n_tokens]
    return tok.decode(ids), ids


def test_map_segments_are_the_token_spans(tiny_tokenizer):
    text, ids = _text(tiny_tokenizer, 500)
    llm = _FakeLLM(tiny_tokenizer)
    res = map_reduce(llm, text, "Summarize.", segment=128, overlap=32)
    assert res.spans == split_segments(len(tiny_tokenizer.encode(text)), 128, 32)
    maps = llm.batches[0]  # one batch with every segment
    assert len(maps) == len(res.spans) > 1
    for i, ((a, b), prompt) in enumerate(zip(res.spans, maps)):
        want = MAP_PROMPT.format(task="Summarize.", index=i + 1, count=len(maps), segment=tiny_tokenizer.decode(ids[a:b]))
        assert prompt == want
    assert len(llm.batches) == 2 and len(llm.batches[1]) == 1  # short partials: one final reduce
    final = llm.batches[1][0]
    positions = [final.index(p) for p in res.levels[0]]
    assert positions == sorted(positions)  # every partial, in document order
    assert res.answer == res.levels[-1][0] and res.num_prompts == len(maps) + 1 and res.num_batches == 2


def test_one_segment_needs_no_reduce(tiny_tokenizer):
    llm = _FakeLLM(tiny_tokenizer)
    res = map_reduce(llm, "a short text", "Summarize.", segment=64, overlap=16)
    assert res.num_prompts == 1 and res.answer == "b1p0 b1p0 b1p0"


def test_hierarchical_reduce_stays_in_budget(tiny_tokenizer):
    """40-word partials: a 128-token budget holds about two, so the partials are reduced in groups,
    level by level, each reduce prompt carrying <= budget tokens of partials (>= 2 per group)."""
    tok = tiny_tokenizer
    text, _ = _text(tok, 2000)
    llm = _FakeLLM(tok, words=40)
    segment = 128
    res = map_reduce(llm, text, "Summarize.", segment=segment, overlap=32)
    n_maps = len(res.spans)
    assert len(llm.batches[0]) == n_maps and n_maps > 16
    sizes = [len(b) for b in llm.batches]
    assert sizes[-1] == 1 and len(sizes) >= 4  # at least two intermediate levels
    for prev, cur in zip(sizes, sizes[1:]):
        assert cur <= prev // 2  # groups of >= 2 partials: each level at least halves
    part = len(tok.encode(" ".join(["b1p0"] * 40))) + 4
    per_group = max(2, segment // part)
    for batch in llm.batches[1:-1]:
        for prompt in batch:
            n_parts = len(re.findall(r"^Part \d+:$", prompt, re.M))
            assert 2 <= n_parts <= per_group + 1  # + 1: a lone last partial joins the previous group
    assert res.num_prompts == sum(sizes) and [len(level) for level in res.levels] == sizes


def test_tiny_engine_batch_equals_single_requests(tiny_hf_dir: Path):
    """Through the real engine: the map batch gives what each prompt gives alone (greedy)."""
    import torch

    from qwenkit.engine.llm import LLM
    from qwenkit.loaders.load import load
    from qwenkit.sampling_params import SamplingParams

    lm = load(tiny_hf_dir, dtype=torch.float32, quantization="int8")
    llm = LLM(lm, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=6)
    text, _ = _text(lm.tokenizer, 150)
    res = map_reduce(llm, text, "Summarize.", segment=60, overlap=20, sampling_params=params)
    assert res.num_batches == 2 and res.num_prompts == len(res.spans) + 1
    ids = lm.tokenizer.encode(text)
    a, b = res.spans[1]
    alone = llm.chat([{"role": "user", "content": MAP_PROMPT.format(
        task="Summarize.", index=2, count=len(res.spans), segment=lm.tokenizer.decode(ids[a:b]))}], params, use_tqdm=False)
    assert alone[0].outputs[0].text.strip() == res.levels[0][1]


def test_summarize_cli(tiny_hf_dir: Path, tmp_path: Path, capsys, caplog):
    from qwenkit.cli.main import main
    from qwenkit.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(tiny_hf_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text(_text(tok, 200)[0], encoding="utf-8")
    rc = main(["summarize", str(doc), "-m", str(tiny_hf_dir), "--segment", "80", "--overlap", "20", "-t", "0",
               "-n", "5", "--json", "--threads", "1"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [tuple(s) for s in out["segments"]] == split_segments(len(tok.encode(doc.read_text())), 80, 20)
    assert out["num_prompts"] == len(out["segments"]) + 1 and out["answer"] == out["levels"][-1][0]
    assert main(["summarize", str(tmp_path / "none.txt"), "-m", str(tiny_hf_dir)]) == 2
    assert "no such file" in caplog.text
