"""Real training data available offline, for the real-model training runs in docs/benchmarks.md.

    python scripts/make_train_data.py OUT_DIR

writes
- stdlib-train.jsonl / stdlib-eval.jsonl: {"text"} rows, this machine's Python standard-library
  sources (sorted paths; every 25th file held out), for continued pretraining;
- mbpp-train.jsonl / mbpp-eval.jsonl: {"messages"} rows from MBPP+ (the copy shipped in
  qwenkit.eval.data): the first 200 tasks for SFT, the last 199 held out. The user turn is the
  task (its docstring, with the example assertion), the assistant turn the canonical solution in a
  fenced block;
- mbpp-prompts-train.jsonl / mbpp-prompts-eval.jsonl: {"prompt": [user message], "task_id"} rows
  of the same two splits, for GRPO (the `code` reward runs the task's tests by task_id).
"""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

from qwenkit.eval.mbpp import find_mbpp_plus, load_tasks


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3")
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for i, path in enumerate(stdlib_files()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            (held if i % 25 == 0 else train).append({"text": text})
    for name, rows in (("stdlib-train", train), ("stdlib-eval", held)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    tasks = load_tasks(find_mbpp_plus())
    rows, prompts = [], []
    for task_id, t in tasks.items():
        task = t["prompt"].strip().strip('"').strip()
        answer = t["canonical_solution"].strip("\n")
        user = {"role": "user", "content": f"{task}\nWrite the Python function."}
        rows.append({"messages": [user, {"role": "assistant", "content": f"```python\n{answer}\n```"}]})
        prompts.append({"prompt": [user], "task_id": task_id})
    for name, part in (("mbpp-train", rows[:200]), ("mbpp-eval", rows[200:]),
                       ("mbpp-prompts-train", prompts[:200]), ("mbpp-prompts-eval", prompts[200:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    print(f"{out}: stdlib {len(train)} + {len(held)} files, MBPP+ {len(rows[:200])} + {len(rows[200:])} tasks")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "train-data"))
