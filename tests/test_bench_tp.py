"""`qwenkit bench tp` end to end on the tiny model (one process vs PP = 2 with micro-batches):
the rows run, the greedy tokens are compared, the JSON and the report have their fields. No
timing is asserted."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qwenkit.bench import tp as bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_tp_tiny(tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "tp.json"
    args = p.parse_args([str(tiny_hf_dir), "--modes", "pp-mb,1proc", "--formats", "fp32", "--threads", "1",
                         "--batch", "3", "--prompt-len", "8", "--max-tokens", "4", "--kv-cache-memory", "4MiB",
                         "--json", str(out)])  # fmt: skip
    assert bench.cmd_tp(args) == 0
    report = capsys.readouterr().out
    assert "| fp32 | 1proc | 1 x 1 |" in report and "| fp32 | pp-mb | 2 x 1 |" in report
    assert "CPU:" in report and "load average" in report
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["results"]}
    assert list(rows) == ["1proc", "pp-mb"]  # the baseline runs first whatever the order asked
    assert rows["pp-mb"]["same_tokens_as_1proc"] is True and not rows["pp-mb"]["error"]
    assert all(rows[m][k] > 0 for m in rows for k in ("prefill_tok_s", "decode_tok_s_1", "decode_tok_s_batch"))
    assert set(data["ratios"]) == {"fp32 pp-mb / 1proc"}
    assert data["environment"]["workload"]["batch"] == 3


def test_bench_tp_refuses_unknown_modes() -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    with pytest.raises(SystemExit, match="unknown tp2"):
        bench.cmd_tp(p.parse_args(["m", "--modes", "1proc,tp2"]))
