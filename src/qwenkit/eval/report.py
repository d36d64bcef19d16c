"""Published scores and the result table / JSON file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Qwen2.5-Coder technical report, instruct models, EvalPlus protocol (pass@1, %).
PUBLISHED: dict[str, dict[str, float]] = {
    "qwen2.5-coder-0.5b-instruct": {"humaneval": 61.6, "humaneval+": 57.3, "mbpp": 52.4},
    "qwen2.5-coder-1.5b-instruct": {"humaneval": 70.7, "humaneval+": 66.5, "mbpp": 69.2},
}
_LABELS = {"humaneval": "HumanEval", "humaneval+": "HumanEval+", "mbpp": "MBPP", "mbpp+": "MBPP+"}


def published_scores(model: str) -> dict[str, float]:
    """Scores for a registry name, hub id or file name (case-insensitive, '-GGUF'/quant suffixes ok)."""
    key = os.path.basename(str(model)).lower()
    for name, scores in PUBLISHED.items():
        if key.startswith(name) or name in key:
            return dict(scores)
    return {}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def score_rows(result: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    """(metric label, ours, published, note) rows for one result."""
    pub = published_scores(result.get("model", ""))
    bench = result["benchmark"]
    rows = [(f"{_LABELS[bench]} (base tests)", result["pass@1"], pub.get(bench), "")]
    if bench == "humaneval":
        rows.append(("HumanEval+", None, pub.get("humaneval+"), "not run: HumanEval+ data is not available offline"))
    elif "plus" in result:
        rows.append(("MBPP+ (base + plus tests)", result["plus"]["pass@1"], pub.get("mbpp+"), ""))
    return rows


def format_table(result: dict[str, Any]) -> str:
    rt, gen = result.get("runtime", {}), result.get("generation", {})
    n = result["num_problems"]
    head = (
        f"{result['model']} — {result['benchmark']} — protocol {result['protocol']} — "
        f"{n} problems x {result['num_samples_per_problem']} sample(s)"
    )
    lines = [head, f"{'metric':<28} {'ours':>7} {'published':>10}  note", "-" * 72]
    for label, ours, pub, note in score_rows(result):
        lines.append(f"{label:<28} {_fmt(ours):>7} {_fmt(pub):>10}  {note}")
    for k, v in result.get("pass@k", {}).items():
        if k != "pass@1":
            lines.append(f"{k:<28} {_fmt(v):>7} {'—':>10}")
    lines.append("-" * 72)
    if result.get("limit"):
        lines.append(f"note: --limit {result['limit']}: a subset, not comparable to the published score")
    lines.append(
        f"runtime: {rt.get('format', '?')} ({rt.get('weights', '?')}) -> {rt.get('dtype', '?')} on "
        f"{rt.get('device', '?')}, {rt.get('threads', '?')} threads, backend {gen.get('backend') or '(all resumed)'}"
        + (f", loaded in {rt['load_seconds']:.1f} s" if rt.get("load_seconds") is not None else "")
    )
    tps = gen.get("tokens_per_second")
    lines.append(
        f"generation: {gen.get('samples_generated', 0)} samples ({gen.get('samples_resumed', 0)} resumed), "
        f"{gen.get('tokens', 0)} tokens in {gen.get('seconds', 0):.1f} s"
        + (f" = {tps:.1f} tok/s" if tps else "")
    )
    lines.append(
        f"tests: {result['num_passed']} passed, {result.get('check_seconds', 0):.1f} s in the sandbox; "
        f"wall time {result.get('wall_seconds', 0):.1f} s (prompts, generation, tests; not loading)"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p
