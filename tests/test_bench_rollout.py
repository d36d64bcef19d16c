"""`qwenkit bench rollout` end to end on the tiny model: every engine row runs, the JSON has the
expected fields, the completion counts follow the workload, and the TRL row uses the generation
settings GRPOTrainer builds. No timing is asserted."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("trl")

from qwenkit.bench import rollout as bench  # noqa: E402

P, G, L = 2, 3, 8


def test_bench_rollout_tiny(tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rollout.json"
    rc = bench.main(["--model", str(tiny_hf_dir), "--engines", "qwenkit,qwenkit-int8,qwenkit-autocast,trl,trl-bf16", "--prompts", str(P),
                     "-G", str(G), "--max-completion-length", str(L), "--threads", "1", "--json", str(out)])  # fmt: skip
    report = capsys.readouterr().out
    assert rc == 0, report
    assert "| engine | completions | completion tokens |" in report
    assert "| qwenkit / trl |" in report and "| qwenkit-int8 / trl |" in report and "CPU:" in report

    data = json.loads(out.read_text())
    env = data["environment"]
    assert {"cpu", "cpu_flags", "threads", "versions", "workload"} <= set(env)
    assert env["workload"]["num_generations"] == G and env["workload"]["prompts"] == P
    rows = {r["engine"]: r for r in data["results"]}
    assert set(rows) == {"qwenkit", "qwenkit-int8", "qwenkit-autocast", "trl", "trl-bf16"}
    for r in rows.values():
        assert r["error"] is None
        assert r["completions"] == P * G
        # every completion has 1..L tokens; the ones that did not end on EOS hit the limit
        assert r["ended_with_eos"] * 1 + (P * G - r["ended_with_eos"]) * L >= r["completion_tokens"] >= P * G
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
    assert rows["qwenkit"]["config"]["dtype"] == "float32" and rows["qwenkit"]["config"]["quantization"] == "none"
    assert rows["trl"]["config"]["rows"] == P * G
    gc = rows["trl"]["config"]["generation_config"]
    assert gc["do_sample"] is True and gc["max_new_tokens"] == L and gc["top_k"] == 0
    assert rows["trl-bf16"]["config"]["autocast"] == "bfloat16"
    assert rows["qwenkit-autocast"]["config"]["autocast"] == "bfloat16"
    assert set(data["ratios"]) == {f"{q} / {t}" for q in ("qwenkit", "qwenkit-int8", "qwenkit-autocast")
                                   for t in ("trl", "trl-bf16")}


def test_trl_generation_config_is_grpo_trainers(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """Our mirror against the GenerationConfig and EOS ids a real GRPOTrainer (TRL 1.16) builds."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    args = GRPOConfig(output_dir=str(tmp_path), max_completion_length=L, num_generations=G,
                      per_device_train_batch_size=G, use_cpu=True, report_to=[], temperature=0.7)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tok)  # fmt: skip
    ours, eos = bench.trl_generation_config(model, trainer.processing_class,
                                            Namespace(max_completion_length=L, temperature=0.7))  # fmt: skip
    assert ours.to_dict() == trainer.generation_config.to_dict()
    assert eos == trainer.eos_token_ids
