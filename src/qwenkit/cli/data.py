"""`qwenkit data ...`: building training data. `pairs`: preference pairs by execution feedback
(`qwenkit.train.pairs`)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("qwenkit.data")


def cmd_pairs(args: argparse.Namespace) -> int:
    import torch

    from qwenkit.eval.generation import EngineGenerator, SampleStore
    from qwenkit.loaders.load import load
    from qwenkit.train import pairs as P

    config = P.PairsConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           max_tokens=args.max_tokens, seed=args.seed, pairs_per_task=args.pairs_per_task,
                           timeout_s=args.timeout, extra_meta={"quantization": args.quantization})  # fmt: skip
    tasks = P.select_tasks(P.load_tasks(args.data), args.tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, progress=not args.no_progress, quantization=args.quantization)
    model_name = loaded.source.name or str(args.model)
    samples_path, report_path = P.default_paths(args.out)
    samples_path = Path(args.samples) if args.samples else samples_path
    report_path = Path(args.report) if args.report else report_path
    store = SampleStore(samples_path, config.meta(model_name, str(args.data or "mbpp+")), overwrite=args.overwrite)
    checks = P.CheckCache(P.checks_path(samples_path), overwrite=args.overwrite)
    engine_args: dict[str, Any] = {"max_num_seqs": args.max_num_seqs}
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    if args.kv_cache_memory:
        engine_args["kv_cache_memory"] = args.kv_cache_memory

    report = P.make_pairs(tasks, loaded.tokenizer, lambda: EngineGenerator(loaded, **engine_args), config,
                          args.out, store, checks, report_path, args.workers, not args.no_progress)  # fmt: skip
    report = {"model": model_name, **report}
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    g = report["generation"]
    print(f"{model_name}: {report['tasks']} tasks x {config.n} samples, pass rate {100 * report['pass_rate']:.1f}%, "
          f"{report['tasks_with_both']} tasks with both outcomes, {report['pairs']} pairs"
          + (f", {g['tokens_per_second']:.1f} tok/s" if g["tokens_per_second"] else ""))  # fmt: skip
    print(f"pairs: {args.out}\nreport: {report_path}\nsamples: {samples_path}")
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    data = subparsers.add_parser("data", help="build training data: preference pairs, ...")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "pairs", help="preference pairs by execution feedback (for `qwenkit train dpo` / TRL's DPOTrainer)",
        description="Sample --n completions per coding task through the engine, run each against the task's "
        "tests in the sandbox, and write (passing, failing) completions as chosen/rejected pairs in TRL's "
        "conversational preference format, plus a report. Rerun the same command to resume.",
    )  # fmt: skip
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")
    p.add_argument("--data", default=None, help="MBPP+-style tasks JSONL[.gz] (default: the packaged MBPP+)")
    p.add_argument("--tasks", default=None, help="A-B: tasks A..B of the file, 1-based (1-200 = the first 200)")
    p.add_argument("--out", "-o", required=True, help="pairs JSONL (report, samples, checks go next to it)")
    p.add_argument("--report", default=None, help="report JSON (default: OUT stem + .report.json)")
    p.add_argument("--samples", default=None, help="resumable samples JSONL (default: OUT stem + .samples.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="discard stored samples and verdicts")
    p.add_argument("--n", type=int, default=8, help="completions sampled per task")
    p.add_argument("--temperature", "-t", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens per completion")
    p.add_argument("--seed", type=int, default=0, help="sample j of every task uses seed + j")
    p.add_argument("--pairs-per-task", type=int, default=1, help="at most this many pairs per task")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per check (default: MBPP+ 600, assertion tests 10)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="parallel test processes (default: CPU count)")
    g = p.add_argument_group("engine")
    g.add_argument("--quantization", "-q", default="auto", help="runtime weight format (auto = int8; none = fp32)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="concurrent sequences")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", default=None, help='e.g. "2GiB"')
    g.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pairs)
    return data
