"""`qwenkit bench train` on the tiny model: report format, JSON fields, and equal first-step losses.

Tiny model, tiny synthetic corpus, one step per engine: the two engines run the same model on the
same first batch, so their first-step losses (before any update) must agree closely in fp32.
No timing is asserted.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from qwenkit.bench import train as bench  # noqa: E402

SEQ_LEN, BATCH = 32, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        body = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}" for j in range(40))
        (root / f"m{i}.py").write_text(body + "\n")
    (root / "skip.txt").write_text("not python")
    return root


def test_rows_are_deterministic_cuts_of_the_sorted_corpus(tiny_hf_dir: Path, corpus: Path) -> None:
    files = bench.corpus_files(corpus)
    assert [f.name for f in files] == ["m0.py", "m1.py", "m2.py"]  # *.py only, sorted
    rows = bench.build_rows(tiny_hf_dir, 3, SEQ_LEN, corpus)
    assert len(rows) == 3 and all(len(r) == SEQ_LEN for r in rows)
    assert rows == bench.build_rows(tiny_hf_dir, 3, SEQ_LEN, corpus)
    with pytest.raises(ValueError, match="need"):
        bench.build_rows(tiny_hf_dir, 10_000, SEQ_LEN, corpus)


def test_bench_train_tiny_both_engines_agree(tiny_hf_dir: Path, corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "train.json"
    rc = bench.main(["--model", str(tiny_hf_dir), "--corpus", str(corpus), "--modes", "full,lora",
                     "--precision", "fp32", "--steps", "1", "--warmup-steps", "1", "--seq-len", str(SEQ_LEN),
                     "--batch", str(BATCH), "--threads", "1", "--json", str(out)])  # fmt: skip
    report = capsys.readouterr().out
    assert rc == 0, report
    assert "| engine | mode | precision | tokens/s | peak RSS GB | first-step loss |" in report
    assert "| qwenkit / trl | full | fp32 |" in report and "| qwenkit / trl | lora | fp32 |" in report
    assert "CPU:" in report and "versions: torch" in report and "trl" in report

    data = json.loads(out.read_text())
    env = data["environment"]
    assert {"cpu", "cpu_flags", "threads", "versions", "workload"} <= set(env)
    assert {"torch", "transformers", "trl", "peft"} <= set(env["versions"])
    results = {(r["engine"], r["mode"]): r for r in data["results"]}
    assert set(results) == {("qwenkit", "full"), ("trl", "full"), ("qwenkit", "lora"), ("trl", "lora")}
    for r in results.values():
        assert r["error"] is None
        assert r["precision"] == "fp32" and r["seq_len"] == SEQ_LEN and r["batch"] == BATCH
        assert len(r["losses"]) == 2 and len(r["step_s"]) == 2
        assert r["timed_tokens"] == SEQ_LEN * BATCH and r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
        assert r["config"]["peak_rss_gb_self_report"] > 0
    for mode in ("full", "lora"):
        ours, theirs = results[("qwenkit", mode)], results[("trl", mode)]
        # the equal-loss check: same model, same first batch, before any update
        assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-4)
    # LoRA starts from B = 0: its first loss is the base model's, as full training's
    assert results[("qwenkit", "lora")]["first_loss"] == pytest.approx(results[("qwenkit", "full")]["first_loss"],
                                                                       rel=1e-6)  # fmt: skip
    assert results[("qwenkit", "lora")]["trainable_params"] == results[("trl", "lora")]["trainable_params"]
    # both engines update the model: the second step's loss moves in the same direction
    for mode in ("full", "lora"):
        ours, theirs = results[("qwenkit", mode)], results[("trl", mode)]
        assert ours["losses"][1] == pytest.approx(theirs["losses"][1], rel=1e-3)


def test_an_hf_folder_is_used_as_it_is(tiny_hf_dir: Path) -> None:
    assert bench.hf_model_dir(str(tiny_hf_dir)) == tiny_hf_dir


def test_report_lists_errors_and_ratios() -> None:
    a = bench.TrainResult("qwenkit", "lora", "bf16", tokens_per_s=300.0, peak_rss_gb=3.0, first_loss=1.0)
    b = bench.TrainResult("trl", "lora", "bf16", tokens_per_s=200.0, peak_rss_gb=4.0, first_loss=1.0005)
    c = bench.TrainResult("trl", "full", "bf16", error="boom")
    table = bench.format_report([a, b, c], {"cpu": "X", "cpu_flags": ["avx2"], "threads": 2, "cores": 2,
                                            "versions": {"torch": "2"}})  # fmt: skip
    assert "| qwenkit / trl | lora | bf16 | 1.50× | 0.75× | 1.000000 vs 1.000500 (rel 5.0e-04) |" in table
    assert "| trl | full | bf16 | error: boom |" in table
