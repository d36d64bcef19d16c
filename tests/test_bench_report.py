"""The side-by-side bench's bookkeeping: best-of-rounds merge and the ratio table."""
from __future__ import annotations

from qwenkit.bench.decode import EngineResult, best_of, format_report


def _r(engine: str, dec: float, p512: float, rss: float = 100.0, error: str | None = None) -> EngineResult:
    return EngineResult(engine, "m", 2, decode_tps=dec, prefill_tps={"512": p512}, ttft_s={"512": 512 / p512},
                        peak_rss_mb=rss, error=error)  # fmt: skip


def test_best_of_takes_each_metric_from_its_best_round() -> None:
    best = best_of([_r("qwenkit", 20.0, 150.0, 900), _r("qwenkit", 25.0, 120.0, 800), _r("qwenkit", 0, 1, error="x")])
    assert best.decode_tps == 25.0
    assert best.prefill_tps["512"] == 150.0
    assert abs(best.ttft_s["512"] - 512 / 150.0) < 1e-12
    assert best.peak_rss_mb == 900
    assert len(best.rounds) == 3 and best.rounds[2]["error"] == "x"
    assert best_of([_r("a", 0, 1, error="boom")]).error == "boom"


def test_report_prints_ratios_against_each_engine() -> None:
    table = format_report([_r("qwenkit", 30.0, 150.0), _r("llama.cpp", 25.0, 100.0), _r("transformers", 6.0, 160.0)])
    assert "| qwenkit / llama.cpp | 1.20× | 1.50× |" in table
    assert "| qwenkit / transformers | 5.00× | 0.94× |" in table


def test_batched_decode_columns_best_of_and_ratios() -> None:
    a = EngineResult("qwenkit", "m", 2, batch_tps={"1": 30.0, "16": 120.0})
    b = EngineResult("qwenkit", "m", 2, batch_tps={"1": 33.0, "16": 100.0})
    best = best_of([a, b])
    assert best.batch_tps == {"1": 33.0, "16": 120.0}
    other = EngineResult("llama.cpp", "m", 2, batch_tps={"1": 30.0, "16": 60.0})
    table = format_report([best, other])
    assert "batch@1 tok/s | batch@16 tok/s" in table and "decode tok/s" not in table
    assert "| qwenkit / llama.cpp | 1.10× | 2.00× |" in table


def test_qwenkit_prefill_timing_waits_for_every_chunk(tiny_hf_dir) -> None:
    """A chunked prefill yields its first token only after its last chunk: the prefill time must
    run to that step, not to the end of the first chunk."""
    from qwenkit.bench.decode import QwenkitEngine

    eng = QwenkitEngine(str(tiny_hf_dir), "none", max_len=128, chunk=16)
    assert eng.prefill(list(range(3, 67))) > 0  # 64 tokens in chunks of 16
    assert eng.steps_to_first_token == 4
    eng.prefill(list(range(3, 15)))  # one chunk
    assert eng.steps_to_first_token == 1
