"""Benchmark items for decontamination: HumanEval, MBPP+ (the packaged copies) and user JSONL / JSON / Parquet files."""
from __future__ import annotations

import json
from pathlib import Path

from qwenkit.errors import DataError

__all__ = ["benchmark_items"]

_ID_KEYS = ("task_id", "id", "name")
_PROMPT_KEYS = ("prompt", "question", "text", "problem")
_SOLUTION_KEYS = ("canonical_solution", "solution", "completion", "answer", "code")


def _file_items(path: Path) -> list[tuple[str, str, str]]:
    """Items of a user benchmark file (JSONL / JSON / Parquet, read by the training data reader)."""
    from qwenkit.data.readers import read_records

    if not path.is_file():
        raise DataError(f"{path}: decontamination benchmark file not found")
    items = []
    for rec in read_records(path, check=False):
        d = rec.data
        prompt = next((d[k] for k in _PROMPT_KEYS if isinstance(d.get(k), str)), "")
        sol = next((d[k] for k in _SOLUTION_KEYS if isinstance(d.get(k), str)), "")
        if not prompt and not sol:
            raise rec.error(f"needs a text field (one of {_PROMPT_KEYS + _SOLUTION_KEYS})")
        ident = next((str(d[k]) for k in _ID_KEYS if k in d), str(rec.line))
        items.append((f"{path.name.split('.')[0]}/{ident}", prompt, sol))
    return items


def benchmark_items(names: list[str]) -> list[tuple[str, str, str]]:
    """``(item id, prompt, solution)`` for each of ``names``: ``humaneval``, ``mbpp`` (MBPP+), or a JSONL / JSON / Parquet path."""
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
            items += _file_items(Path(name))
    return items
