"""Benchmark items for decontamination: HumanEval, MBPP+ (the packaged copies) and user JSONL."""
from __future__ import annotations

import json
from pathlib import Path

from qwenkit.errors import DataError

__all__ = ["benchmark_items"]

_ID_KEYS = ("task_id", "id", "name")
_PROMPT_KEYS = ("prompt", "question", "text", "problem")
_SOLUTION_KEYS = ("canonical_solution", "solution", "completion", "answer", "code")


def _jsonl_items(path: Path) -> list[tuple[str, str, str]]:
    import gzip

    if not path.is_file():
        raise DataError(f"{path}: decontamination benchmark file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: invalid JSON ({e})") from None
            prompt = next((rec[k] for k in _PROMPT_KEYS if isinstance(rec.get(k), str)), "")
            sol = next((rec[k] for k in _SOLUTION_KEYS if isinstance(rec.get(k), str)), "")
            if not prompt and not sol:
                raise DataError(f"{path} line {n}: needs a text field (one of {_PROMPT_KEYS + _SOLUTION_KEYS})")
            ident = next((str(rec[k]) for k in _ID_KEYS if k in rec), str(n))
            items.append((f"{path.stem}/{ident}", prompt, sol))
    return items


def benchmark_items(names: list[str]) -> list[tuple[str, str, str]]:
    """``(item id, prompt, solution)`` for each of ``names``: ``humaneval``, ``mbpp`` (MBPP+), or a JSONL path."""
    items: list[tuple[str, str, str]] = []
    for name in names:
        key = str(name).lower()
        if key == "humaneval":
            from qwenkit.eval.humaneval import load_problems

            items += [(f"humaneval/{tid}", p["prompt"], p["canonical_solution"]) for tid, p in load_problems().items()]
        elif key in ("mbpp", "mbpp+", "mbppplus"):
            from qwenkit.eval.mbpp import find_mbpp_plus, read_mbpp_plus

            # only the text is needed: skip load_tasks' (slow) deserialisation of the test inputs
            for line in read_mbpp_plus(find_mbpp_plus()).split(b"\n"):
                if line.strip():
                    t = json.loads(line)
                    items.append((f"mbpp/{t['task_id']}", t["prompt"], t["canonical_solution"]))
        else:
            items += _jsonl_items(Path(name))
    return items
