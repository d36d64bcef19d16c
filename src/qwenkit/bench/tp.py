"""`qwenkit bench tp`: tensor / pipeline parallel on this CPU against one process.

Modes (each a fresh engine over the same weights, loaded again for it; gloo between processes):
- ``1proc``: one process x `--threads` threads (the fused CPU runtime, what `LLM` runs by default);
- ``tp``: `tensor_parallel_size` = `--ranks`, each process 1 thread;
- ``pp``: `pipeline_parallel_size` = `--ranks`, one micro-batch a step (the stages take turns);
- ``pp-mb``: the same with `pp_micro_batches` = `--ranks` (the stages overlap on large steps).

Per mode and weight format (`--formats`, default fp32 and int8), after an untimed warm-up:
prefill tok/s of `--batch` prompts of `--prompt-len` tokens (windows of a code snippet) (the first engine steps, one large
batch), and decode tok/s of 1 and of `--batch` sequences stepping together ((tokens - 1) per
sequence / time from every sequence's first token to the last). Greedy; each mode's tokens are
compared with ``1proc``'s of the same format. Printed with the ratios to ``1proc``, the CPU flags
and the load average (the machine may be shared); `--json` writes everything.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("1proc", "tp", "pp", "pp-mb")
# Prompts are windows of this code (real text: random ids give near-tied logits, where the fused
# CPU runtime of ``1proc`` and the plain modules of the parallel modes can pick different tokens).
TEXT = '''import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)
    retries: int = field(default=0, compare=False)


class Scheduler:
    """Run jobs by priority; a failed job is retried up to max_retries times."""

    def __init__(self, max_retries: int = 3) -> None:
        self.queue: list[Job] = []
        self.max_retries = max_retries
        self.done: list[str] = []
        self.failed: list[str] = []

    def submit(self, name: str, priority: int) -> None:
        heapq.heappush(self.queue, Job(priority, name))

    def run(self, work) -> None:
        while self.queue:
            job = heapq.heappop(self.queue)
            try:
                work(job.name)
            except Exception:
                if job.retries < self.max_retries:
                    job.retries += 1
                    heapq.heappush(self.queue, job)
                else:
                    self.failed.append(job.name)
            else:
                self.done.append(job.name)


def parse_config(lines):
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        config[key.strip()] = value.strip()
    return config
'''
FORMATS = {"fp32": "none", "int8": "int8"}


def log(msg: str) -> None:
    print(f"[bench tp] {msg}", file=sys.stderr, flush=True)


@dataclass
class TPResult:
    mode: str
    fmt: str
    processes: int
    threads_per_process: int
    prefill_tok_s: float = 0.0
    decode_tok_s_1: float = 0.0
    decode_tok_s_batch: float = 0.0
    same_tokens_as_1proc: bool | None = None
    error: str = ""
    token_ids: list[list[int]] = field(default_factory=list, repr=False)


def engine_args(mode: str, ranks: int, micro: int) -> dict[str, Any]:
    if mode == "tp":
        return {"tensor_parallel_size": ranks}
    if mode in ("pp", "pp-mb"):
        return {"pipeline_parallel_size": ranks, "pp_micro_batches": micro if mode == "pp-mb" else 1}
    return {}


def _run(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float, float]:
    """Greedy `max_tokens` for every prompt, together. Returns (tokens per prompt, prefill seconds
    = until every sequence has its first token, decode seconds = from then to the last token)."""
    from qwenkit.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        if t_first is None and len(tokens) == len(prompts) and all(tokens.values()):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    assert t_first is not None
    return [tokens[str(i)] for i in range(len(prompts))], t_first - t0, t_end - t_first


def run_bench(args: argparse.Namespace) -> tuple[list[TPResult], dict[str, Any]]:
    import torch

    from qwenkit.bench.train import environment
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.loaders.load import load

    env = environment(args.threads)
    env["load_average_before"] = os.getloadavg()
    log(f"CPU: {env['cpu']} [{' '.join(env['cpu_flags'])}]; load average {env['load_average_before'][0]:.1f}")
    results: list[TPResult] = []
    for fmt in args.formats:
        prompts: list[list[int]] = []
        base: TPResult | None = None
        for mode in args.modes:
            procs = 1 if mode == "1proc" else args.ranks
            threads = args.threads if mode == "1proc" else 1
            res = TPResult(mode, fmt, procs, threads)
            torch.set_num_threads(threads)  # spawned ranks take this process's thread count
            engine = lm = None
            try:
                lm = load(args.model, quantization=FORMATS[fmt], progress=False)  # sharding changes it in place
                if not prompts:  # windows of TEXT 16 tokens apart (no shared prefix blocks)
                    ids = lm.tokenizer.encode(TEXT)
                    need = 16 * (args.batch - 1) + args.prompt_len
                    ids = (ids * (need // len(ids) + 1))[:need]
                    prompts = [ids[16 * i : 16 * i + args.prompt_len] for i in range(args.batch)]
                engine = LLMEngine(lm.model, lm.tokenizer, kv_cache_memory=args.kv_cache_memory,
                                   max_num_seqs=max(args.batch, 1), max_num_batched_tokens=args.batch * args.prompt_len,
                                   **engine_args(mode, args.ranks, args.ranks))  # fmt: skip
                _run(engine, prompts[:2], 4)  # warm-up (both step shapes)
                one, _, d1 = _run(engine, prompts[:1], args.max_tokens)
                many, pre, db = _run(engine, prompts, args.max_tokens)
                res.prefill_tok_s = args.batch * args.prompt_len / pre
                res.decode_tok_s_1 = (args.max_tokens - 1) / d1
                res.decode_tok_s_batch = args.batch * (args.max_tokens - 1) / db
                res.token_ids = [one[0], *many]
            except Exception as e:  # reported in the table, not a crash of the whole run
                import traceback

                traceback.print_exc()
                res.error = f"{type(e).__name__}: {e}"
            finally:
                if engine is not None:
                    engine.shutdown()
                engine = lm = None
                gc.collect()
            if mode == "1proc":
                base = res
            elif base is not None and not res.error and not base.error:
                res.same_tokens_as_1proc = res.token_ids == base.token_ids
            log(f"{fmt} {mode}: prefill {res.prefill_tok_s:.1f} tok/s, decode {res.decode_tok_s_1:.2f} tok/s (1 seq), "
                f"{res.decode_tok_s_batch:.2f} tok/s ({args.batch} seqs), same tokens: {res.same_tokens_as_1proc}")  # fmt: skip
            results.append(res)
    env["load_average_after"] = os.getloadavg()
    env["workload"] = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                       "max_tokens": args.max_tokens, "ranks": args.ranks}  # fmt: skip
    return results, env


def ratios(results: list[TPResult]) -> dict[str, dict[str, float]]:
    """Each mode's numbers over ``1proc``'s of the same format."""
    base = {r.fmt: r for r in results if r.mode == "1proc" and not r.error}
    out = {}
    for r in results:
        b = base.get(r.fmt)
        if r.mode == "1proc" or r.error or b is None:
            continue
        out[f"{r.fmt} {r.mode} / 1proc"] = {
            k: getattr(r, k) / getattr(b, k) for k in ("prefill_tok_s", "decode_tok_s_1", "decode_tok_s_batch")
            if getattr(b, k)
        }  # fmt: skip
    return out


def format_report(results: list[TPResult], env: dict[str, Any]) -> str:
    from qwenkit.bench.train import environment_lines

    w = env["workload"]
    b = w["batch"]
    lines = [f"| format | mode | processes x threads | prefill tok/s ({b} x {w['prompt_len']}) | decode tok/s, 1 seq | "
             f"decode tok/s, {b} seqs | tokens == 1proc |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    rat = ratios(results)
    for r in results:
        if r.error:
            lines.append(f"| {r.fmt} | {r.mode} | {r.processes} x {r.threads_per_process} | error: {r.error} | | | |")
            continue
        q = rat.get(f"{r.fmt} {r.mode} / 1proc", {})

        def cell(key: str, value: float) -> str:
            return f"{value:.2f}" + (f" ({q[key]:.2f}x)" if key in q else "")

        same = "" if r.same_tokens_as_1proc is None else ("yes" if r.same_tokens_as_1proc else "NO")
        lines.append(f"| {r.fmt} | {r.mode} | {r.processes} x {r.threads_per_process} | "
                     f"{cell('prefill_tok_s', r.prefill_tok_s)} | {cell('decode_tok_s_1', r.decode_tok_s_1)} | "
                     f"{cell('decode_tok_s_batch', r.decode_tok_s_batch)} | {same} |")  # fmt: skip
    before, after = env["load_average_before"][0], env["load_average_after"][0]
    lines += ["", f"model {w['model']}, greedy {w['max_tokens']} tokens; load average (1 min) before / after: "
              f"{before:.1f} / {after:.1f}", *environment_lines(env)]  # fmt: skip
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--formats", default="fp32,int8", help="comma-separated: fp32, int8")
    p.add_argument("--ranks", type=int, default=2, help="processes of the tp / pp modes (1 thread each)")
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process mode")
    p.add_argument("--batch", type=int, default=8, help="sequences of the prefill and batched-decode runs")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--json", default="bench-results/tp.json")


def cmd_tp(args: argparse.Namespace) -> int:
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [m for m in args.modes if m not in MODES] + [f for f in args.formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"--modes / --formats: unknown {', '.join(bad)} (modes: {', '.join(MODES)}; "
                         f"formats: {', '.join(FORMATS)})")  # fmt: skip
    if args.batch < 2 or args.max_tokens < 2 or args.prompt_len < 1 or args.ranks < 2:
        raise SystemExit("need --batch >= 2, --max-tokens >= 2, --prompt-len >= 1 and --ranks >= 2")
    if "1proc" in args.modes:  # the baseline runs first
        args.modes.remove("1proc")
        args.modes.insert(0, "1proc")
    results, env = run_bench(args)
    print(format_report(results, env))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in results]
        for row in rows:
            row.pop("token_ids")
        path.write_text(json.dumps({"environment": env, "results": rows, "ratios": ratios(results)}, indent=1))
        log(f"wrote {path}")
    return 1 if any(r.error for r in results) else 0
