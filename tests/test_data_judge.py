"""The LLM judge step: the keep rule on given scores, the parse of the judge's JSON, and a run
through qwenkit's engine with a tiny random model (garbage scores, but schema-valid JSON)."""
from __future__ import annotations

import gzip
import json
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qwenkit.curate.judge import DEFAULT_WEIGHTS, JUDGE_SCHEMA, judge_keep, parse_scores
from qwenkit.curate.stages import run_stage


@pytest.mark.parametrize("scores,keep,value", [
    ((10, 10, 0), True, 1.0),
    ((9, 7, 0), True, 0.84),
    ((8, 8, 0), False, 0.80),  # the rule is strict: > 0.8
    ((10, 10, 5), False, 0.75),
    ((10, 4, 0), True, 0.82),
    ((0, 10, 0), False, 0.30),
])  # fmt: skip
def test_seed_rule(scores: tuple[int, int, int], keep: bool, value: float) -> None:
    s = dict(zip(("relevance", "informativeness", "toxicity"), scores))
    want = 0.7 * s["relevance"] / 10 + 0.3 * s["informativeness"] / 10 - 0.5 * s["toxicity"] / 10
    got_keep, got_value = judge_keep(s)
    assert got_value == pytest.approx(want, abs=1e-12) and got_value == pytest.approx(value, abs=1e-12)
    assert got_keep == keep == (want > 0.8)


def test_weights_and_threshold_configurable() -> None:
    s = {"relevance": 5, "informativeness": 5, "toxicity": 0}
    assert judge_keep(s) == (False, pytest.approx(0.5))
    assert judge_keep(s, {"relevance": 1.0, "informativeness": 0.0, "toxicity": -1.0}, 0.4) == (True, pytest.approx(0.5))


def test_parse_scores() -> None:
    assert parse_scores('{"relevance":3,"informativeness":10,"toxicity":0}') == \
        {"relevance": 3, "informativeness": 10, "toxicity": 0}  # fmt: skip
    with pytest.raises(ValueError, match="'toxicity' must be an integer 0-10"):
        parse_scores('{"relevance":3,"informativeness":10,"toxicity":11}')
    with pytest.raises(ValueError, match="'relevance'"):
        parse_scores('{"informativeness":1,"toxicity":1}')
    with pytest.raises(ValueError, match="not JSON"):
        parse_scores('{"relevance":')


def _tiny_llm(path: str) -> Any:
    from qwenkit.engine.llm import LLM

    return LLM(path, quantization="none", max_num_seqs=8, seed=0)


def test_judge_stage_with_tiny_model(tiny_hf_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("xgrammar")
    src = tmp_path / "in"
    src.mkdir()
    texts = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat.", "Water boils at 100 C.", "x" * 50,
             "Paris is the capital of France."]  # fmt: skip
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(texts)))
    # a low threshold so that some garbage scores pass and the keep rule is exercised both ways
    rep = run_stage("judge", src, tmp_path / "j", {"llm_factory": partial(_tiny_llm, str(tiny_hf_dir)),
                                                   "threshold": 0.0, "batch_size": 4, "max_chars": 200})  # fmt: skip
    rows = [json.loads(x) for f in sorted((tmp_path / "j" / "scores").glob("*.jsonl"))
            for x in f.read_text().splitlines()]  # fmt: skip
    unparsable = rep["dropped"].get("judge_unparsable", 0)
    assert len(rows) + unparsable == 5 and rep["scored"] == len(rows) >= 4
    kept_ids = set()
    with gzip.open(next((tmp_path / "j" / "data").glob("*.jsonl.gz")), "rt") as f:
        for line in f:
            d = json.loads(line)
            kept_ids.add(d["id"])
            assert set(d["metadata"]["judge"]) == {"relevance", "informativeness", "toxicity", "value"}
    for r in rows:
        scores = {k: r[k] for k in ("relevance", "informativeness", "toxicity")}
        jsonschema.validate(scores, JUDGE_SCHEMA)
        value = sum(DEFAULT_WEIGHTS[k] * v / 10 for k, v in scores.items())
        assert r["value"] == pytest.approx(value, abs=1e-12)
        assert (r["doc"] in kept_ids) == (value > 0.0)
    assert rep["docs_out"] == len(kept_ids) == sum(r["value"] > 0.0 for r in rows)
    assert rep["dropped"].get("judge_below_threshold", 0) == sum(r["value"] <= 0.0 for r in rows)
    assert sum(rep["histograms"]["relevance"]) == len(rows) and rep["samples_per_s"] > 0
    assert unparsable == 0, rep["dropped"]  # the schema (0-10 integers) is enforced by the grammar
