"""One code-generation eval run: prompts -> one generation batch -> sanitize -> sandboxed tests
-> pass@k, as a JSON-ready dict (see `report` for the printed table)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol

from qwenkit.eval.checker import CheckOutcome, parallel_map
from qwenkit.eval.generation import Generator, SampleStore, generate_samples
from qwenkit.eval.passk import mean_pass_at_k
from qwenkit.eval.protocols import Protocol
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Benchmark(TypingProtocol):
    name: str
    problems: dict[str, dict[str, Any]]

    def prompt(self, task_id: str) -> str: ...
    def entry_point(self, task_id: str) -> str: ...
    def check(self, task_id: str, solution: str) -> CheckOutcome: ...


@dataclass(frozen=True)
class RunConfig:
    protocol: Protocol
    n: int = 1
    temperature: float = 0.0
    top_p: float | None = None  # default: 0.95 when sampling, 1.0 greedy (the maker's decoder)
    seed: int | None = None
    max_tokens: int | None = None  # default: the protocol's
    ks: tuple[int, ...] = (1, 10, 100)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 samples need --temperature > 0 (greedy samples are identical)")

    def sampling_params(self, prompt_len: int, index: int) -> SamplingParams:
        max_new = self.protocol.max_new_tokens(prompt_len)
        if self.max_tokens is not None:
            max_new = min(max_new, self.max_tokens)
        greedy = self.temperature == 0
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p if self.top_p is not None else (1.0 if greedy else 0.95),
            max_tokens=max_new,
            stop=list(self.protocol.stop),
            seed=None if self.seed is None else self.seed + index,
        )

    def meta(self, benchmark: str, model: str, task_ids: list[str]) -> dict[str, Any]:
        """What a samples file must match to be resumed."""
        return {
            "benchmark": benchmark, "model": model, "protocol": self.protocol.name, "n": self.n,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "max_tokens": self.max_tokens,
        }  # fmt: skip


def run_codegen_eval(
    bench: Benchmark,
    tokenizer: Any,
    make_generator: Any,
    store: SampleStore,
    config: RunConfig,
    task_ids: list[str],
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`make_generator()` builds the generator only if something is left to generate."""
    t_start = time.perf_counter()
    requests = []
    for tid in task_ids:
        ids = tokenizer.encode(config.protocol.prompt(bench.prompt(tid), tokenizer))
        for j in range(config.n):
            requests.append((tid, j, ids, config.sampling_params(len(ids), j)))
    todo = sum((tid, j) not in store for tid, j, _, _ in requests)
    generator: Generator | None = make_generator() if todo else None
    gen = generate_samples(generator, store, requests, progress) if generator else None

    keys = [(tid, j) for tid, j, _, _ in requests]
    samples = [store.samples[k] for k in keys]
    solutions = [config.protocol.postprocess(s.completion, bench.entry_point(s.task_id)) for s in samples]
    t_check = time.perf_counter()
    outcomes: list[CheckOutcome] = parallel_map(
        lambda i: bench.check(keys[i][0], solutions[i]), range(len(keys)), workers, f"test {bench.name}", progress
    )
    check_s = time.perf_counter() - t_check

    per_task: dict[str, list[dict[str, Any]]] = {tid: [] for tid in task_ids}
    for s, sol, out in zip(samples, solutions, outcomes):
        rec = {
            "index": s.index, "passed": out.passed, "status": out.status, "error": out.error,
            "finish_reason": s.finish_reason, "num_tokens": s.num_tokens,
            "completion": s.completion, "solution": sol,
        }  # fmt: skip
        if out.plus_passed is not None:
            rec["plus_passed"], rec["plus_status"] = out.plus_passed, out.plus_status
        per_task[s.task_id].append(rec)
    base = mean_pass_at_k({t: [r["passed"] for r in v] for t, v in per_task.items()}, config.ks)
    result: dict[str, Any] = {
        "benchmark": bench.name,
        "protocol": config.protocol.name,
        "pass@1": round(base.get("pass@1", 0.0), 2),
        "pass@k": {k: round(v, 2) for k, v in base.items()},
        "num_problems": len(task_ids),
        "num_samples_per_problem": config.n,
        "num_passed": sum(r["passed"] for v in per_task.values() for r in v),
    }
    if any("plus_passed" in r for v in per_task.values() for r in v):
        plus = mean_pass_at_k({t: [bool(r.get("plus_passed")) for r in v] for t, v in per_task.items()}, config.ks)
        result["plus"] = {"pass@1": round(plus.get("pass@1", 0.0), 2), "pass@k": {k: round(v, 2) for k, v in plus.items()}}
    result["generation"] = {
        "backend": gen.backend if gen else None,
        "samples_generated": gen.num_generated if gen else 0,
        "samples_resumed": len(keys) - (gen.num_generated if gen else 0),
        "tokens": gen.num_tokens if gen else 0,
        "seconds": round(gen.seconds, 2) if gen else 0.0,
        "tokens_per_second": round(gen.tokens_per_second, 2) if gen else None,
        "total_completion_tokens": sum(s.num_tokens for s in samples),
    }
    result["check_seconds"] = round(check_s, 2)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    result["problems"] = [
        {"task_id": t, "passed": any(r["passed"] for r in v), "n": len(v), "num_correct": sum(r["passed"] for r in v),
         "samples": v}  # fmt: skip
        for t, v in per_task.items()
    ]
    return result
