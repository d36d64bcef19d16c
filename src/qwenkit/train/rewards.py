"""GRPO rewards: code execution in the sandbox, a format reward, and user functions.

Every reward function has TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`
(kwargs: `completion_ids` and the dataset's other columns, one value per completion); completions
are strings, or `[{"role": "assistant", "content": ...}]` for conversational prompts (as TRL
passes them). `None` means "does not apply" (NaN, left out of the weighted sum as in TRL).

`code`: the fraction of the row's tests passed. Tests are MBPP-style `test_list` (assert
strings) or a built-in MBPP+ `task_id` (its `assertion` lines). The completion's code is taken as
the evaluator does (fenced block, then `sanitize`), run once in qwenkit's sandbox, then each
assert separately with its own time limit; the whole run has a wall-clock limit too.
"""
from __future__ import annotations

import ast
import importlib
import json
import logging
import math
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from qwenkit.errors import QwenkitError
from qwenkit.eval.checker import parallel_map
from qwenkit.eval.sandbox import SandboxLimits, run_python
from qwenkit.eval.sanitize import extract_fenced_code, sanitize

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list]


class RewardError(QwenkitError):
    pass


# Runs inside the sandbox (stdlib only): the solution, then each test under its own SIGALRM;
# results go to a private copy of stdout, so what the code prints cannot forge them.
_TEST_PROGRAM = r'''
import json, os, signal
_out = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1); os.dup2(_null, 2)
with open("task.json") as _f:
    _task = json.load(_f)

class _Timeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _Timeout()

signal.signal(signal.SIGALRM, _alarm)

def _run(src, g, seconds):
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        exec(compile(src, "<solution>", "exec"), g)
        return True
    except BaseException:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

_g = {"__name__": "__solution__"}
_ok = _run(_task["solution"], _g, _task["test_timeout"])
for _i, _t in enumerate(_task["tests"]):
    _passed = _ok and _run(_t, _g, _task["test_timeout"])
    _out.write(json.dumps({"test": _i, "passed": bool(_passed)}) + "\n")
    _out.flush()
'''


def completion_text(completion: Any) -> str:
    """A completion as text: the string, or the content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion)


def solution_code(text: str, entry_point: str | None = None) -> str:
    """The code the evaluator would run: the fenced Python block(s), then evalplus's sanitize."""
    code = extract_fenced_code(text)
    return sanitize(code, entry_point) or code


def run_tests(code: str, tests: Sequence[str], timeout_s: float = 5.0) -> float:
    """Fraction of `tests` (assert statements) that pass after running `code` in the sandbox.
    Each test (and the code's top level) gets `timeout_s`; a test still running is a failure."""
    if not tests:
        return 0.0
    limits = SandboxLimits(timeout_s=timeout_s * (len(tests) + 1) + 5.0)
    task = {"solution": code, "tests": list(tests), "test_timeout": timeout_s}
    res = run_python(_TEST_PROGRAM, files={"task.json": json.dumps(task)}, limits=limits)
    passed = 0
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("passed") is True:
            passed += 1
    return passed / len(tests)


@lru_cache(maxsize=1)
def _mbpp_tasks() -> dict[str, dict[str, Any]]:
    from qwenkit.eval.mbpp import load_tasks

    return load_tasks()


def tests_of(row: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(assert lines, entry point) of a row: `test_list` or an MBPP+ `task_id`."""
    tests = row.get("test_list")
    entry = row.get("entry_point")
    if tests is None and row.get("task_id") is not None:
        tid = str(row["task_id"])
        tid = tid if tid.startswith("Mbpp/") else f"Mbpp/{tid}"
        task = _mbpp_tasks().get(tid)
        if task is None:
            raise RewardError(f"task_id {row['task_id']!r}: not an MBPP+ task")
        tests = [ln for ln in task["assertion"].splitlines() if ln.strip()]
        entry = entry or task["entry_point"]
    if tests is None:
        return [], entry
    if isinstance(tests, str):
        tests = [tests]
    return [str(t) for t in tests], entry


def make_code_reward(timeout_s: float = 5.0, workers: int | None = None) -> RewardFunc:
    def code(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        jobs = []
        for i, c in enumerate(completions):
            row = {k: v[i] for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
            tests, entry = tests_of(row)
            jobs.append((solution_code(completion_text(c), entry), tests) if tests else None)

        def score(job: tuple[str, list[str]] | None) -> float | None:
            return None if job is None else run_tests(job[0], job[1], timeout_s)

        return parallel_map(score, jobs, workers=workers)

    return code


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 when the completion holds a fenced Python block that parses, else 0.0."""
    out: list[float | None] = []
    for c in completions:
        text = completion_text(c)
        code = extract_fenced_code(text)
        ok = code is not text and bool(code.strip())
        if ok:
            try:
                ast.parse(code)
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                ok = False
        out.append(1.0 if ok else 0.0)
    return out


def load_reward_func(spec: str, timeout_s: float = 5.0) -> tuple[str, RewardFunc]:
    """`code`, `format` or `module:function` (a user function with TRL's signature)."""
    if spec == "code":
        return "code", make_code_reward(timeout_s)
    if spec == "format":
        return "format", format_reward
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise RewardError(f"reward function {spec!r}: expected code, format or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward function {spec!r}: {e}") from None
    if not callable(fn):
        raise RewardError(f"reward function {spec!r} is not callable")
    return name, fn


def score(
    funcs: Sequence[tuple[str, RewardFunc]],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: Mapping[str, list],
) -> list[list[float]]:
    """Rewards per completion and function (NaN for None), TRL's call convention."""
    table: list[list[float]] = [[math.nan] * len(funcs) for _ in completions]
    for j, (name, fn) in enumerate(funcs):
        out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if not isinstance(out, (list, tuple)) or len(out) != len(completions):
            raise RewardError(f"reward function {name!r} returned {type(out).__name__} "
                              f"of length {len(out) if hasattr(out, '__len__') else '?'}, "
                              f"expected a list of {len(completions)}")
        for i, v in enumerate(out):
            table[i][j] = math.nan if v is None else float(v)
    return table
