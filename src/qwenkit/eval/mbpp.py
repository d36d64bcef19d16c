"""MBPP+ (evalplus MbppPlus v0.1.0, 399 tasks), scored the way evalplus scores it.

The jsonl ships gzipped in `qwenkit/eval/data/` (Apache-2.0, derived from MBPP, CC BY 4.0: see
`data/MbppPlus-v0.1.0.LICENSE.txt`) and is checked against its sha256 when loaded;
`--mbpp-path` / `$QWENKIT_MBPP_PLUS` point at another copy (plain or .gz).
Each task has `base_input` (the original MBPP test inputs) and `plus_input` (evalplus's extra
inputs) but no expected outputs: like evalplus, the canonical solution's outputs are the
expected ones, with per-input time limits `max(1 s, 4 x canonical time)` (evalplus's evaluate
defaults). We compute them inside each check's sandbox, right before the candidate runs on the
same input (see `sandbox_program.check_mbpp` for why).

JSON cannot hold tuples, sets or complex numbers, so some tasks' inputs are converted back
after loading (`deserialize_inputs`, the same per-task table as evalplus's
`mbpp_deserialize_inputs`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from qwenkit.errors import QwenkitError
from qwenkit.eval.checker import CheckOutcome, run_program
from qwenkit.eval.sandbox import SandboxLimits
from qwenkit.eval.sandbox_program import MBPP_OUTPUT_NOT_NONE_TASKS

logger = logging.getLogger(__name__)

MBPP_PLUS_FILENAME = "MbppPlus-v0.1.0.jsonl"
# sha256 of the uncompressed evalplus v0.1.0 release file
MBPP_PLUS_SHA256 = "a855b9de667baea8e2f8aa61f898767a7336872208a85222b35622545e819fe9"
PACKAGED_PATH = Path(__file__).resolve().parent / "data" / (MBPP_PLUS_FILENAME + ".gz")
ENV_PATH = "QWENKIT_MBPP_PLUS"
MIN_TIME_LIMIT_S = 1.0
TIME_LIMIT_FACTOR = 4.0
SUITE_TIMEOUT_CAP_S = 60.0  # evalplus: EVALPLUS_TIMEOUT_PER_TASK
MODULE_TIME_LIMIT_S = 10.0  # running the solution's top level (imports, definitions)
# Whole check: canonical + candidate on every input of both suites. The in-sandbox limits above
# stop a slow candidate long before; this bounds pathological cases. Mbpp/599's canonical
# solution alone sums range(10**8) several times: ~200 s for the whole check on 2 busy cores.
DEFAULT_TIMEOUT_S = 600.0
MEMORY_BYTES = 4 << 30  # evalplus's 4 GB


def find_mbpp_plus(path: str | os.PathLike[str] | None = None) -> Path:
    """The MBPP+ jsonl (or .jsonl.gz): an explicit path, $QWENKIT_MBPP_PLUS, or the packaged copy."""
    if path:
        p = Path(path)
        if p.is_dir():
            p = next((p / n for n in (MBPP_PLUS_FILENAME, MBPP_PLUS_FILENAME + ".gz") if (p / n).is_file()),
                     p / MBPP_PLUS_FILENAME)  # fmt: skip
        if not p.is_file():
            raise QwenkitError(f"MBPP+ file not found: {p}")
        return p
    if os.environ.get(ENV_PATH):
        return find_mbpp_plus(os.environ[ENV_PATH])
    if not PACKAGED_PATH.is_file():
        raise QwenkitError(
            f"the packaged MBPP+ file is missing ({PACKAGED_PATH}): reinstall qwenkit, or pass "
            f"--mbpp-path / set ${ENV_PATH} to {MBPP_PLUS_FILENAME}"
        )
    return PACKAGED_PATH


def read_mbpp_plus(file: Path) -> bytes:
    """The jsonl bytes of `file` (gunzipped if .gz). The packaged copy must match
    MBPP_PLUS_SHA256; another copy that does not only gets a warning."""
    data = file.read_bytes()
    if file.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise QwenkitError(f"MBPP+ file {file} is not a valid gzip file: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != MBPP_PLUS_SHA256:
        if file.resolve() == PACKAGED_PATH:
            raise QwenkitError(
                f"the packaged MBPP+ file {file} is corrupt: sha256 {digest}, expected {MBPP_PLUS_SHA256}; "
                "reinstall qwenkit"
            )
        logger.warning("%s is not evalplus %s (sha256 %s): scores are not comparable to published ones",
                       file, MBPP_PLUS_FILENAME, digest)  # fmt: skip
    return data


# task number -> how its JSON inputs map back to Python values (evalplus's table)
_TUPLE_ARGS = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616,
               630, 726, 740, 744, 809}  # fmt: skip  # every argument is a tuple
_LIST_OF_TUPLES_ARGS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
_FIRST_LIST_OF_TUPLES = {75, 413, 444, 753}
_SECOND_TUPLE = {106, 750}
_FIRST_TUPLE = {250, 405, 446, 617, 720, 763, 808}
_TUPLE_OF_TUPLES_ARGS = {259, 401, 445}
_ALL_TUPLES = {580, 615, 791}


def _deep_tuple(x: Any) -> Any:
    return tuple(_deep_tuple(i) for i in x) if isinstance(x, list) else x


def _convert_one(num: int) -> Callable[[list], Any] | None:
    if num in _TUPLE_ARGS:
        return lambda inp: [tuple(a) for a in inp]
    if num in _LIST_OF_TUPLES_ARGS:
        return lambda inp: [[tuple(x) for x in a] for a in inp]
    if num in _FIRST_LIST_OF_TUPLES:
        return lambda inp: [[tuple(x) for x in inp[0]], inp[1]]
    if num in _SECOND_TUPLE:
        return lambda inp: [inp[0], tuple(inp[1])]
    if num == 115:
        return lambda inp: [[set(x) if isinstance(x, list) and x else {} for x in inp[0]]]
    if num == 124:
        return lambda inp: (float(inp[0]), complex(inp[1]))
    if num in _FIRST_TUPLE:
        return lambda inp: [tuple(inp[0]), inp[1]]
    if num in _TUPLE_OF_TUPLES_ARGS:
        return lambda inp: [tuple(tuple(x) for x in a) for a in inp]
    if num == 278:
        return lambda inp: [tuple(tuple(x) if isinstance(x, list) else x for x in inp[0])]
    if num == 307:
        return lambda inp: [tuple(inp[0]), inp[1], inp[2]]
    if num == 722:
        return lambda inp: [{k: tuple(v) for k, v in inp[0].items()}, *inp[1:]]
    if num == 252:
        return lambda inp: [complex(inp[0])]
    if num in _ALL_TUPLES:
        return _deep_tuple
    return None


def deserialize_inputs(task_id: str, inputs: list) -> list:
    convert = _convert_one(int(task_id.split("/")[-1]))
    return [convert(inp) for inp in inputs] if convert else inputs


def load_tasks(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    file = find_mbpp_plus(path)
    tasks = {}
    for line in read_mbpp_plus(file).split(b"\n"):  # JSON strings may hold U+2028: no splitlines()
        if line.strip():
            t = json.loads(line)
            t["base_input"] = deserialize_inputs(t["task_id"], t["base_input"])
            t["plus_input"] = deserialize_inputs(t["task_id"], t["plus_input"])
            tasks[t["task_id"]] = t
    return tasks


class MbppPlus:
    name = "mbpp"
    published_key = "mbpp"

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.file = find_mbpp_plus(path)
        self.problems = load_tasks(self.file)
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_bytes=MEMORY_BYTES)

    def prompt(self, task_id: str) -> str:
        return self.problems[task_id]["prompt"]

    def entry_point(self, task_id: str) -> str:
        return self.problems[task_id]["entry_point"]

    def canonical_solution(self, task_id: str) -> str:
        t = self.problems[task_id]
        return t["prompt"] + t["canonical_solution"]

    # ---------------------------------------------------------------- checking
    def check(self, task_id: str, solution: str) -> CheckOutcome:
        return check_task(self.problems[task_id], solution, self.limits)


def check_task(t: dict[str, Any], solution: str, limits: SandboxLimits) -> CheckOutcome:
    """Check `solution` against one MBPP+-style task (`prompt`, `canonical_solution`,
    `entry_point`, `base_input`, optional `plus_input` / `atol`), evalplus's way."""
    task = {
        "solution": solution,
        "canonical": t["prompt"] + t["canonical_solution"],
        "entry_point": t["entry_point"],
        "atol": t.get("atol", 0),
        "output_not_none": t["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS,
        "min_time_limit": MIN_TIME_LIMIT_S,
        "time_limit_factor": TIME_LIMIT_FACTOR,
        "suite_time_cap": SUITE_TIMEOUT_CAP_S,
        "module_time_limit": MODULE_TIME_LIMIT_S,
        "suites": [{"name": "base", "inputs": t["base_input"]}, {"name": "plus", "inputs": t.get("plus_input", [])}],
    }
    reports, res = run_program("mbpp", task, limits)
    by_suite = {r["suite"]: r for r in reports if "suite" in r}
    base, plus = by_suite.get("base"), by_suite.get("plus")
    if base is None:
        status = "timeout" if res.timed_out else "crash"
        return CheckOutcome(False, status, res.describe(), False, status)
    base_ok = base["status"] == "pass"
    if plus is None:
        plus_status = "timeout" if res.timed_out else ("crash" if base_ok else "skipped")
        plus = {"status": plus_status, "error": res.describe() if base_ok else None}
    plus_ok = base_ok and plus["status"] == "pass"
    return CheckOutcome(base_ok, base["status"], base.get("error") or plus.get("error"), plus_ok, plus["status"])
