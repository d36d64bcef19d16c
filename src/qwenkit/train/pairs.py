"""Preference pairs by execution feedback (`qwenkit data pairs`).

For each coding task with tests: sample `n` completions through qwenkit's engine, run each in
the eval sandbox, and keep (passing, failing) completions of the same prompt as (chosen,
rejected) pairs in TRL's conversational preference format, what `qwenkit train dpo` and TRL's
`DPOTrainer` read:

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], "task_id": ...}

Tasks: MBPP+-style JSONL rows with `task_id`, `prompt` (the function signature + docstring),
`entry_point` and tests, either MBPP+'s (`canonical_solution` + `base_input`, optional
`plus_input` / `atol`: the canonical solution's outputs are the expected ones, evalplus's way) or
assertion code (`test`: a string, HumanEval's `check(candidate)` or plain asserts; `test_list`:
MBPP's list of assert strings). Default: the packaged MBPP+, `tasks="1-200"` = its first 200.

The prompt is the `chat-template` eval protocol's user turn (`qwenkit.eval.protocols`), rendered
with the model's chat template; a completion is the raw assistant answer, and what is executed is
its fenced code, sanitized (the protocol's `postprocess`). A sample passes when every test passes
(MBPP+: base + plus). Samples go to a resumable `SampleStore` file as they finish, verdicts to a
`.checks.jsonl` cache next to it, so a rerun neither resamples nor re-executes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from qwenkit.errors import DataError
from qwenkit.eval.checker import CheckOutcome, parallel_map, run_program
from qwenkit.eval.generation import Generator, SampleStore, generate_samples
from qwenkit.eval.mbpp import DEFAULT_TIMEOUT_S as MBPP_TIMEOUT_S
from qwenkit.eval.mbpp import MEMORY_BYTES, check_task, deserialize_inputs, find_mbpp_plus, read_mbpp_plus
from qwenkit.eval.protocols import QWEN_USER, get_protocol
from qwenkit.eval.sandbox import SandboxLimits
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PROTOCOL = get_protocol("chat-template")  # fenced-code extraction + sanitize
ASSERT_TIMEOUT_S = 10.0  # a task checked by assertion code: the whole run, interpreter start included
_MBPP_ID = re.compile(r"Mbpp/\d+")


@dataclass
class Task:
    task_id: str
    prompt: str
    entry_point: str
    source: str  # "file:line", for error messages
    mbpp: dict[str, Any] | None = None  # MBPP+ fields (canonical_solution, base_input, ...)
    test: str | None = None  # assertion code (defines check(candidate), or plain asserts)

    def messages(self) -> list[dict[str, str]]:
        """The conversation the completion answers: one user turn (the eval's request)."""
        return [{"role": "user", "content": QWEN_USER.format(prompt=self.prompt.strip()).rstrip("\n")}]


# ------------------------------------------------------------------------------------ tasks
def _open_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from e
    return data.split(b"\n")  # JSON strings may hold U+2028: no splitlines()


def _parse_task(rec: Any, where: str) -> Task:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a task must be a JSON object, got {type(rec).__name__}")
    for key in ("task_id", "prompt", "entry_point"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            raise DataError(f"{where}: needs a non-empty string {key!r}")
    tid = rec["task_id"]
    if "base_input" in rec:
        if not isinstance(rec.get("canonical_solution"), str):
            raise DataError(f"{where}: MBPP+-style tests (base_input) need a string 'canonical_solution'")
        mbpp = {k: rec[k] for k in ("prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
                if k in rec}  # fmt: skip
        for key in ("base_input", "plus_input"):
            if mbpp.get(key) == {}:
                mbpp[key] = []  # MBPP+ writes an empty plus suite as {}
            if key in mbpp and not (isinstance(mbpp[key], list) and all(isinstance(x, list) for x in mbpp[key])):
                raise DataError(f"{where}: {key!r} must be a list of argument lists")
        if _MBPP_ID.fullmatch(tid):  # evalplus's tuple/set conversions for MBPP+'s own tasks
            for key in ("base_input", "plus_input"):
                if key in mbpp:
                    mbpp[key] = deserialize_inputs(tid, mbpp[key])
        return Task(tid, rec["prompt"], rec["entry_point"], where, mbpp=mbpp)
    if isinstance(rec.get("test"), str) and rec["test"].strip():
        test = rec["test"]
    elif isinstance(rec.get("test_list"), list) and rec["test_list"] and all(isinstance(t, str) for t in rec["test_list"]):
        test = "\n".join(rec["test_list"])
    else:
        raise DataError(f"{where}: task {tid!r} has no tests: give 'base_input' + 'canonical_solution' (MBPP+), "
                        "'test' (code) or 'test_list' (assert strings)")  # fmt: skip
    if not re.search(r"^def check\(", test, re.MULTILINE):
        test += "\n\ndef check(candidate):\n    pass\n"  # plain asserts run at exec time
    return Task(tid, rec["prompt"], rec["entry_point"], where, test=test)


def load_tasks(path: str | os.PathLike[str] | None = None) -> list[Task]:
    """Tasks from an MBPP+-style JSONL(.gz) file, or the packaged MBPP+ (sha256-checked)."""
    if path is None:
        file = find_mbpp_plus()
        lines = read_mbpp_plus(file).split(b"\n")
    else:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file}: no such task file")
        lines = _open_lines(file)
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: invalid JSON ({e})") from None
        task = _parse_task(rec, where)
        if task.task_id in seen:
            raise DataError(f"{where}: task_id {task.task_id!r} repeats {seen[task.task_id]}")
        seen[task.task_id] = where
        tasks.append(task)
    if not tasks:
        raise DataError(f"{file}: no tasks")
    return tasks


def select_tasks(tasks: Sequence[Task], spec: str | None) -> list[Task]:
    """`spec` "A-B" = tasks A..B (1-based, inclusive, file order; "1-200" = the first 200),
    "N" = task N alone; None = all."""
    if not spec:
        return list(tasks)
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
    if not m:
        raise ValueError(f"--tasks {spec!r}: expected A-B (1-based, inclusive) or N")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= len(tasks):
        raise ValueError(f"--tasks {spec!r}: out of range 1-{len(tasks)}")
    return list(tasks[lo - 1 : hi])


# ---------------------------------------------------------------------------------- checking
def check_solution(task: Task, solution: str, timeout_s: float | None = None) -> CheckOutcome:
    """Run `solution` against the task's tests in the sandbox."""
    if task.mbpp is not None:
        return check_task(task.mbpp, solution, SandboxLimits(timeout_s=timeout_s or MBPP_TIMEOUT_S,
                                                             memory_bytes=MEMORY_BYTES))  # fmt: skip
    limits = SandboxLimits(timeout_s=timeout_s or ASSERT_TIMEOUT_S)
    payload = {"prompt": "", "solution": solution, "test": task.test, "entry_point": task.entry_point}
    reports, res = run_program("humaneval", payload, limits)
    if res.timed_out:
        return CheckOutcome(False, "timeout", f"ran past {limits.timeout_s:.0f}s")
    if not reports:
        return CheckOutcome(False, "crash", res.describe())
    r = reports[-1]
    return CheckOutcome(r["status"] == "pass", r["status"], r.get("error"))


def passed(outcome: CheckOutcome) -> bool:
    """All tests: MBPP+'s base and plus suites, else the one suite."""
    return bool(outcome.plus_passed if outcome.plus_passed is not None else outcome.passed)


class CheckCache:
    """Append-only JSONL of verdicts keyed by (task_id, index, sha256 of the executed code)."""

    def __init__(self, path: Path, overwrite: bool = False) -> None:
        self.path = path
        self.verdicts: dict[tuple[str, int, str], dict[str, Any]] = {}
        if path.exists() and not overwrite:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    self.verdicts[(r["task_id"], r["index"], r["sha256"])] = r
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s: skipping a truncated line", path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    @staticmethod
    def key(task_id: str, index: int, code: str) -> tuple[str, int, str]:
        return task_id, index, hashlib.sha256(code.encode()).hexdigest()

    def add(self, key: tuple[str, int, str], passed: bool, status: str) -> None:
        rec = {"task_id": key[0], "index": key[1], "sha256": key[2], "passed": passed, "status": status}
        self.verdicts[key] = rec
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------- pairing
def pair_indices(n_pass: int, n_fail: int, limit: int) -> list[tuple[int, int]]:
    """Deterministic (passing, failing) index pairs, at most `limit`: diagonals of the
    n_pass x n_fail grid, so the first pairs use as many different completions as they can."""
    out = []
    for offset in range(n_fail):
        for i in range(n_pass):
            if len(out) == limit:
                return out
            out.append((i, (i + offset) % n_fail))
    return out


def build_pairs(messages: list[dict[str, str]], task_id: str, samples: Sequence[tuple[str, bool, bool]],
                limit: int) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """`samples`: (completion text, passed, truncated) in sample order. Chosen: distinct passing
    completions that ended on their own (a truncated answer is no example to imitate); rejected:
    distinct failing ones. Returns (pair records, counts)."""
    chosen: list[str] = []
    rejected: list[str] = []
    for text, ok, truncated in samples:
        if ok and not truncated and text.strip():
            if text not in chosen:
                chosen.append(text)
        elif not ok and text not in rejected:
            rejected.append(text)
    pairs = [
        {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen[i]}],
         "rejected": [{"role": "assistant", "content": rejected[j]}], "task_id": task_id}
        for i, j in pair_indices(len(chosen), len(rejected), limit)
    ]  # fmt: skip
    return pairs, {"distinct_chosen": len(chosen), "distinct_rejected": len(rejected)}


# -------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class PairsConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 512
    seed: int | None = 0
    pairs_per_task: int = 1
    timeout_s: float | None = None  # per check (default: MBPP+'s 600 s, assertion tests 10 s)
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"--n must be >= 2 (a pair needs two samples), got {self.n}")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: greedy samples of one prompt are identical")
        if self.max_tokens < 1 or self.pairs_per_task < 1:
            raise ValueError("--max-tokens and --pairs-per-task must be >= 1")

    def sampling_params(self, index: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens,
                              seed=None if self.seed is None else self.seed + index)  # fmt: skip

    def meta(self, model: str, data: str) -> dict[str, Any]:
        """What a samples file must match to be resumed (the task range may grow)."""
        return {"kind": "pairs", "model": model, "data": data, "protocol": PROTOCOL.name, "n": self.n,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "seed": self.seed, **self.extra_meta}  # fmt: skip


def default_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(samples, report) next to the pairs file."""
    o = Path(out)
    stem = o.name[: -len(".jsonl")] if o.name.endswith(".jsonl") else o.stem
    return o.with_name(stem + ".samples.jsonl"), o.with_name(stem + ".report.json")


def checks_path(samples: str | os.PathLike[str]) -> Path:
    """The verdict cache belonging to a samples file."""
    s = Path(samples)
    name = s.name[: -len(".samples.jsonl")] if s.name.endswith(".samples.jsonl") else s.name
    return s.with_name(name + ".checks.jsonl")


def make_pairs(
    tasks: Sequence[Task],
    tokenizer: Any,
    make_generator: Callable[[], Generator],
    config: PairsConfig,
    out: str | os.PathLike[str],
    store: SampleStore,
    checks: CheckCache,
    report_path: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample what `store` lacks (`make_generator()` is only called then), check what `checks`
    lacks, write the pairs JSONL and the report JSON; return the report."""
    t_start = time.perf_counter()
    requests = []
    prompt_tokens = 0
    for task in tasks:
        ids = tokenizer.apply_chat_template(task.messages(), add_generation_prompt=True, tokenize=True)
        prompt_tokens += len(ids)
        for j in range(config.n):
            requests.append((task.task_id, j, list(ids), config.sampling_params(j)))
    todo = sum((tid, j) not in store for tid, j, _, _ in requests)
    gen = generate_samples(make_generator(), store, requests, progress) if todo else None

    by_id = {t.task_id: t for t in tasks}
    keys = [(tid, j) for tid, j, _, _ in requests]
    samples = [store.samples[k] for k in keys]
    codes = [PROTOCOL.postprocess(s.completion, by_id[s.task_id].entry_point) for s in samples]
    cache_keys = [CheckCache.key(s.task_id, s.index, c) for s, c in zip(samples, codes)]
    to_check = [i for i, k in enumerate(cache_keys) if k not in checks.verdicts]
    t_check = time.perf_counter()

    def run_check(i: int) -> None:
        o = check_solution(by_id[samples[i].task_id], codes[i], config.timeout_s)
        checks.add(cache_keys[i], passed(o), o.status)  # appends are small single writes

    parallel_map(run_check, to_check, workers, "test", progress and bool(to_check))
    check_s = time.perf_counter() - t_check

    per_task: dict[str, list[tuple[str, bool, bool]]] = {t.task_id: [] for t in tasks}
    for s, k in zip(samples, cache_keys):
        per_task[s.task_id].append((s.completion, checks.verdicts[k]["passed"], s.finish_reason == "length"))
    n_pass = sum(ok for v in per_task.values() for _, ok, _ in v)
    all_pairs: list[dict[str, Any]] = []
    tasks_with_pass = tasks_with_both = truncated_pass = 0
    for task in tasks:
        v = per_task[task.task_id]
        pairs, _ = build_pairs(task.messages(), task.task_id, v, config.pairs_per_task)
        all_pairs += pairs
        tasks_with_pass += any(ok for _, ok, _ in v)
        tasks_with_both += any(ok for _, ok, _ in v) and not all(ok for _, ok, _ in v)
        truncated_pass += sum(ok and tr for _, ok, tr in v)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in all_pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    n_samples = len(samples)
    report: dict[str, Any] = {
        "tasks": len(tasks),
        "samples": n_samples,
        "samples_per_task": config.n,
        "passed": n_pass,
        "pass_rate": round(n_pass / n_samples, 4) if n_samples else 0.0,
        "tasks_with_pass": tasks_with_pass,
        "tasks_with_both": tasks_with_both,
        "passing_truncated": truncated_pass,
        "pairs": len(all_pairs),
        "generation": {
            "samples_generated": gen.num_generated if gen else 0,
            "samples_resumed": n_samples - (gen.num_generated if gen else 0),
            "prompt_tokens": prompt_tokens * config.n,
            "completion_tokens": gen.num_tokens if gen else 0,
            "seconds": round(gen.seconds, 2) if gen else 0.0,
            "tokens_per_second": round(gen.tokens_per_second, 2) if gen else None,
        },
        "checks": {"run": len(to_check), "cached": n_samples - len(to_check), "seconds": round(check_s, 2)},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "settings": store.meta,
        "files": {"pairs": str(out), "samples": str(store.path), "checks": str(checks.path)},
    }
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=1) + "\n")
    logger.info("%d tasks x %d samples: pass rate %.1f%%, %d tasks with both outcomes, %d pairs -> %s",
                len(tasks), config.n, 100 * report["pass_rate"], tasks_with_both, len(all_pairs), out)  # fmt: skip
    return report
