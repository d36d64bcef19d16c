"""`qwenkit data ...`: building training data. `pairs`: preference pairs by execution feedback
(`qwenkit.train.pairs`); read / clean / dedup / decontaminate / judge / classify / mix /
exec-filter / tokenize and `run pipeline.yaml`: the curation pipeline (`qwenkit.curate`)."""
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


def _quiet_datatrove(verbose: bool) -> None:
    # datatrove logs through loguru (per-task stats tables); keep warnings unless asked
    from loguru import logger as loguru_logger

    loguru_logger.remove()
    loguru_logger.add(lambda m: logging.getLogger("datatrove").log(m.record["level"].no, m.record["message"]),
                      level="DEBUG" if verbose else "WARNING")  # fmt: skip


def _executor(args: argparse.Namespace) -> Any:
    from qwenkit.data.pipeline.run import ExecutorConfig

    return ExecutorConfig(executor=args.executor, workers=args.workers, address=args.address)


def _print_report(rep: dict[str, Any], out: Path) -> None:
    dropped = ", ".join(f"{k} {v}" for k, v in rep.get("dropped", {}).items() if v) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in rep.get("skipped", {}).items() if v)
    print(f"{rep['stage']}: {rep['docs_in']} docs in, {rep['docs_out']} out; dropped: {dropped}"
          + (f"; skipped: {skipped}" if skipped else "") + f" ({rep['wall_s']:.1f}s, {rep['docs_per_s']} docs/s)")  # fmt: skip
    print(f"report: {out / 'report.json'}")


def cmd_stage(args: argparse.Namespace) -> int:
    from qwenkit.curate.stages import run_stage

    _quiet_datatrove(args.verbose)
    opts = {k: v for k, v in args.stage_opts(args).items() if v is not None}
    rep = run_stage(args.stage, args.input, args.output, opts, _executor(args))
    _print_report(rep, Path(args.output))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from qwenkit.curate.stages import load_pipeline_file, run_pipeline
    from qwenkit.data.pipeline.run import ExecutorConfig

    _quiet_datatrove(args.verbose)
    spec = load_pipeline_file(args.pipeline)
    exe = ExecutorConfig(executor=args.executor or spec.get("executor", "local"),
                         workers=args.workers or int(spec.get("workers", 1)),
                         address=args.address or spec.get("address"))  # fmt: skip
    rep = run_pipeline(spec, exe)
    for st in rep["steps"]:
        print(f"{st['stage']:>14}: {st['docs_in']:>8} in {st['docs_out']:>8} out  {st['wall_s']:8.1f}s  "
              f"{st['docs_per_s']} docs/s  dropped {st['dropped'] or {}}")  # fmt: skip
    print(f"output: {rep['final']}\nreport: {Path(rep['output']) / 'report.json'}")
    return 0


def _exec_args(p: argparse.ArgumentParser, workers_default: int | None = 1) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--executor", choices=["local", "ray"], default=None if workers_default is None else "local",
                   help="local processes (default) or a Ray cluster")  # fmt: skip
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument("--workers", type=int, default=workers_default, help="tasks run at once")
    p.add_argument("--verbose", "-v", action="store_true", help="datatrove's per-task logs")


def _add_stage(sub: Any, name: str, help: str, opts: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help + " Writes OUT/report.json; rerun to resume.")
    p.add_argument("input", help="input folder (raw files for read; a previous step's output otherwise)")
    p.add_argument("--output", "-o", required=True, help="output folder (never the input)")
    _exec_args(p)
    p.set_defaults(func=cmd_stage, stage=name, stage_opts=opts)
    return p


def _add_pipeline_parsers(sub: Any) -> None:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p = _add_stage(sub, "read", "Raw files (JSONL / Parquet / text / source trees) to documents.",
                   lambda a: {"format": a.format, "text_key": a.text_key, "max_bytes": a.max_bytes, "tasks": a.tasks})
    p.add_argument("--format", choices=["auto", "jsonl", "parquet", "source"], default="auto")
    p.add_argument("--text-key", default=None, help="record field holding the text (default: text)")
    p.add_argument("--max-bytes", type=int, default=None, help="skip source files larger than this (default 1 MiB)")
    p.add_argument("--tasks", type=int, default=None, help="tasks a source tree is split into (default: --workers)")
    p = _add_stage(sub, "clean", "Unicode NFC; Gopher + C4 rules on prose, code rules (line length, "
                   "alphanumeric fraction, auto-generated / minified) on code.",
                   lambda a: {"code": {"max_line_length": a.max_line_length, "min_alnum_fraction": a.min_alnum_fraction},
                              **({"fineweb": {}} if a.fineweb else {})})  # fmt: skip
    p.add_argument("--max-line-length", type=int, default=1000)
    p.add_argument("--min-alnum-fraction", type=float, default=0.25)
    p.add_argument("--fineweb", action="store_true", help="also FineWeb's quality rules on prose")
    p = _add_stage(sub, "dedup", "Exact (content hash) and MinHash-LSH near dedup (datatrove).",
                   lambda a: {"threshold": a.threshold, "ngram_size": a.ngram_size, "exact": not a.no_exact,
                              "near": not a.no_near})  # fmt: skip
    p.add_argument("--threshold", type=float, default=None, help="Jaccard similarity (default 14x8 buckets: ~0.72)")
    p.add_argument("--ngram-size", type=int, default=5, help="words per MinHash shingle")
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--no-near", action="store_true")
    p = _add_stage(sub, "decontaminate", "Drop documents sharing a 13-gram or an exact prompt with HumanEval / "
                   "MBPP+ / your JSONL; the report names each colliding benchmark item.",
                   lambda a: {"benchmarks": a.benchmark, "ngram": a.ngram})  # fmt: skip
    p.add_argument("--benchmark", action="append", default=None,
                   help="humaneval, mbpp or a JSONL file (repeatable; default humaneval + mbpp)")  # fmt: skip
    p.add_argument("--ngram", type=int, default=13)
    _add_stage(sub, "classify", "Label each document's domain: code / math / zh / en / other (heuristic).",
               lambda a: {})  # fmt: skip
    p = _add_stage(sub, "mix", "Sample domains to target ratios; reports achieved ratios.",
                   lambda a: {"targets": json.loads(a.targets) if a.targets else None, "unit": a.unit,
                              "upsample": a.upsample, "seed": a.seed})  # fmt: skip
    p.add_argument("--targets", default=None, help='JSON, default {"code":0.18,"math":0.12,"zh":0.40,"en":0.30}')
    p.add_argument("--unit", choices=["chars", "docs"], default="chars")
    p.add_argument("--upsample", action="store_true", help="repeat scarce domains instead of cutting the rest")
    p.add_argument("--seed", type=int, default=0)
    p = _add_stage(sub, "judge", "Score relevance / informativeness / toxicity with an LLM (JSON-schema output); "
                   "keep when w_R*R + w_I*I + w_T*T > threshold.",
                   lambda a: {"model": a.model, "threshold": a.threshold, "batch_size": a.batch_size,
                              "quantization": a.quantization, "max_chars": a.max_chars,
                              "weights": json.loads(a.weights) if a.weights else None})  # fmt: skip
    p.add_argument("--model", default=None, help="registry name, .gguf, HF folder (default qwen2.5-coder-1.5b-instruct)")
    p.add_argument("--threshold", type=float, default=None, help="default 0.8")
    p.add_argument("--weights", default=None, help='JSON, default {"relevance":0.7,"informativeness":0.3,"toxicity":-0.5}')
    p.add_argument("--batch-size", type=int, default=None, help="samples per engine batch (default 32)")
    p.add_argument("--max-chars", type=int, default=None, help="sample text shown to the judge (default 2000)")
    p.add_argument("--quantization", "-q", default=None, help="runtime weight format (default auto)")
    p = _add_stage(sub, "exec-filter", "Run code samples that carry tests (metadata.tests) in the sandbox; keep passes.",
                   lambda a: {"timeout": a.timeout, "tests_key": a.tests_key})  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, help="seconds per sample (default 10)")
    p.add_argument("--tests-key", default=None, help="metadata field with the tests (default: tests)")
    p = _add_stage(sub, "tokenize", "Tokenize, EOS between documents, write token shards + dataset.json "
                   "(what `qwenkit train pretrain --data OUT` reads).",
                   lambda a: {"tokenizer": a.tokenizer, "max_tokens_per_shard": a.max_tokens_per_shard})  # fmt: skip
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="registry name, .gguf or HF (tokenizer) folder")
    p.add_argument("--max-tokens-per-shard", type=int, default=None)
    p = sub.add_parser("run", help="run a declared pipeline (YAML): read -> ... -> tokenize",
                       description="Run the steps of PIPELINE (input, output, steps: [read, clean, {dedup: "
                       "{threshold: 0.8}}, ...]) in order, each into OUTPUT/<k>-<step>. Rerun to resume.")  # fmt: skip
    p.add_argument("pipeline", help="pipeline YAML")
    _exec_args(p, workers_default=None)
    p.set_defaults(func=cmd_run)


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    data = subparsers.add_parser("data", help="build training data: curation pipeline, preference pairs")
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
    _add_pipeline_parsers(sub)
    return data
