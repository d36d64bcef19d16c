"""Ship `sandbox_program` into the sandbox with one task, collect its JSON-line reports; and run
many such checks concurrently (each check is its own process, so threads only wait)."""
from __future__ import annotations

import inspect
import json
import os
import pickle
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence, TypeVar

from qwenkit.eval import sandbox_program
from qwenkit.eval.sandbox import SandboxLimits, SandboxResult, run_python

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class CheckOutcome:
    """One solution's verdict. For MBPP+, `passed` is the base tests and `plus_passed` base + plus."""

    passed: bool
    status: str  # "pass" | "fail" | "timeout" | "crash"
    error: str | None = None
    plus_passed: bool | None = None
    plus_status: str | None = None


@lru_cache(maxsize=1)
def _program_source() -> str:
    return inspect.getsource(sandbox_program)


def run_program(
    mode: str, task: dict[str, Any], limits: SandboxLimits, collect: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], SandboxResult]:
    """Run `sandbox_program.main(mode)` on `task`; return its reports (those written before a
    crash or kill included) and the raw sandbox result."""
    source = _program_source() + f"\nmain({mode!r})\n"
    res = run_python(
        source,
        files={"task.pkl": pickle.dumps(task, protocol=4)},
        collect=collect,
        limits=limits,
    )
    reports = []
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            reports.append(rec)
    return reports, res


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    desc: str | None = None,
    progress: bool = False,
) -> list[R]:
    """`[fn(x) for x in items]` on a thread pool (order kept), with an optional progress bar."""
    items = list(items)
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, x) for x in items]
        if progress:
            from tqdm import tqdm

            with tqdm(total=len(futures), desc=desc, unit="check", dynamic_ncols=True) as bar:
                for _ in as_completed(futures):
                    bar.update()
        return [f.result() for f in futures]
