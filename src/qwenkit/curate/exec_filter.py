"""Execution filter: a code sample that carries tests (``metadata[tests_key]``: test code or a
list of assert lines) is run with its tests in eval's sandbox and kept only when they pass.
Samples without tests pass through (counted as ``no_tests``)."""
from __future__ import annotations

from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

__all__ = ["ExecFilter"]


class ExecFilter(BaseFilter):
    """Drop reasons: ``tests_failed``, ``tests_timeout``, ``bad_tests`` (not code or a list of strings)."""

    name = "🏃 execution filter"

    def __init__(self, timeout_s: float = 10.0, tests_key: str = "tests") -> None:
        super().__init__()
        if timeout_s <= 0:
            raise ValueError(f"exec-filter timeout must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.tests_key = tests_key

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from qwenkit.eval.sandbox import SandboxLimits, run_python

        tests: Any = doc.metadata.get(self.tests_key)
        if tests is None:
            self.stat_update("no_tests")
            return True
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)
        if not isinstance(tests, str):
            return False, "bad_tests"
        res = run_python(doc.text + "\n\n" + tests + "\n", limits=SandboxLimits(timeout_s=self.timeout_s))
        doc.metadata["exec"] = {"ok": res.ok, "wall_s": round(res.wall_s, 3)}
        if res.ok:
            self.stat_update("tests_passed")
            return True
        return False, "tests_timeout" if res.timed_out else "tests_failed"
