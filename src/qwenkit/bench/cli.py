"""CLI hook: `qwenkit bench decode|batch|prefill|all|throughput|kernels|train|rollout|moe|spec|tp|vl`.

The main CLI registers it with ``add_bench_parser(subparsers)``. `decode`, `batch`, `prefill` and `all`
run `qwenkit.bench.decode` (qwenkit vs llama.cpp vs transformers, one subprocess per engine);
`kernels` runs the linear-kernel micro-benchmark on the real projection shapes; `train` runs
`qwenkit.bench.train` (qwenkit's trainer vs TRL's SFTTrainer, full and LoRA, one subprocess each); `rollout` runs
`qwenkit.bench.rollout` (GRPO rollout generation: qwenkit's engine vs TRL's transformers path).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any


def cmd_side_by_side(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from qwenkit.bench.decode import format_report, run_bench

    results = run_bench(args)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from qwenkit.bench import kernels

    argv = ["--model", args.size, "--shapes", args.shapes, "--m", args.m, "--repeats", str(args.repeats),
            "--threads", str(args.threads)]  # fmt: skip
    if args.kernels:
        argv += ["--kernels", args.kernels]
    if args.json:
        argv += ["--json", args.json]
    return kernels.main(argv)


def cmd_throughput(args: argparse.Namespace) -> int:
    import torch

    from qwenkit.bench.throughput import run_throughput

    torch.set_num_threads(args.threads)
    lo, _, hi = args.prompt_len.partition("-")
    prompt_len: int | tuple[int, int] = (int(lo), int(hi)) if hi else int(lo)
    engine_args = {"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}
    run_throughput(
        args.model, num_requests=args.num_requests,
        concurrency=[int(c) for c in args.concurrency.split(",")], prompt_len=prompt_len,
        output_len=args.output_len, out_json=args.json, llama_cpp=not args.no_llama_cpp,
        quantization=args.quantization, **engine_args,
    )  # fmt: skip
    return 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.bench.decode import add_arguments

    bench = subparsers.add_parser("bench", help="benchmarks: decode, prefill, kernels, train")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    for mode, helptext in (
        ("decode", "single-stream decode tok/s vs llama.cpp and transformers"),
        ("batch", "aggregate decode tok/s of 1/4/16/64 sequences stepping together vs llama.cpp and transformers"),
        ("prefill", "prefill tok/s and TTFT at 128/512/2048 tokens vs llama.cpp and transformers"),
        ("all", "decode, batched decode and prefill in one run"),
    ):
        p = sub.add_parser(mode, help=helptext)
        add_arguments(p)
        p.set_defaults(func=cmd_side_by_side, mode=mode)
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p = sub.add_parser("throughput", help="continuous batching: N requests at concurrency 1/4/16/64 vs llama.cpp")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--num-requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--prompt-len", default="128-512", help="N or LO-HI (uniform random lengths)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kv-cache-memory", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--quantization", "-q", default="auto", help="qwenkit's runtime weight format (auto = int8)")
    p.add_argument("--json", default="bench-results/throughput.json")
    p.set_defaults(func=cmd_throughput)

    p = sub.add_parser("kernels", help="linear kernels on the real projection shapes")
    p.add_argument("--size", choices=["0.5b", "1.5b"], default="0.5b")
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--m", default="1,4,16,64,512")
    p.add_argument("--kernels", default="")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_kernels)

    # one module each (qwenkit.bench.NAME: add_arguments + cmd_NAME), imported on first use
    for name, help_text in (
        ("train", "training tok/s, peak RSS and first-step loss vs TRL SFTTrainer (full, LoRA)"),
        ("spec", "speculative decoding (n-gram, draft model) vs plain decoding, single stream"),
        ("rollout", "GRPO rollout tokens/s: qwenkit's engine vs TRL GRPOTrainer's generate"),
        ("moe", "Qwen2-MoE decode tok/s on a random config: qwenkit vs transformers"),
        ("vl", "Qwen2.5-VL image preprocessing + vision encoder time: qwenkit vs transformers"),
        ("tp", "tensor / pipeline parallel (2 processes x 1 thread) vs 1 process x 2 threads"),
    ):
        module = importlib.import_module(f"qwenkit.bench.{name}")
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=getattr(module, f"cmd_{name}"))
    return bench
