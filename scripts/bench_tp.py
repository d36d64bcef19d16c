"""Tensor parallel on this CPU: TP=2 (2 processes x 1 thread) vs TP=1 (1 process x 2 threads).

Greedy decode of the real model, fp32 weights on both sides (TP splits float weights only);
checks that the tokens are identical, prints CPU flags and the tok/s ratio, writes JSON.

    PYTHONPATH=src python scripts/bench_tp.py --model qwen2.5-coder-0.5b-instruct --max-tokens 64 \
        --out bench-results/tp.json
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from qwenkit.cpu.build import cpu_flags
from qwenkit.engine.llm import LLM
from qwenkit.sampling_params import SamplingParams

PROMPT = "def quicksort(xs):\n    "


def run(model: str, tp: int, threads: int, max_tokens: int) -> dict:
    torch.set_num_threads(threads)
    llm = LLM(model, quantization="none", dtype="float32", tensor_parallel_size=tp, kv_cache_memory="256MiB")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    dt = time.perf_counter() - t0
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    return {"tensor_parallel_size": tp, "threads_per_process": threads, "tokens": len(out.token_ids),
            "seconds": dt, "tok_per_s": len(out.token_ids) / dt, "token_ids": out.token_ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench-results/tp.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    one = run(args.model, 1, 2, args.max_tokens)
    two = run(args.model, 2, 1, args.max_tokens)
    result = {
        "model": args.model, "cpu": platform.processor(), "cpu_flags": flags, "torch": torch.__version__,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        "tp1_2threads": one, "tp2_1thread_each": two,
        "identical_tokens": one["token_ids"] == two["token_ids"],
        "ratio_tp2_over_tp1": two["tok_per_s"] / one["tok_per_s"],
    }
    print(f"CPU flags: {' '.join(flags)}")
    print(f"TP=1 x 2 threads: {one['tok_per_s']:.2f} tok/s   TP=2 x 1 thread: {two['tok_per_s']:.2f} tok/s   "
          f"ratio {result['ratio_tp2_over_tp1']:.2f}   identical tokens: {result['identical_tokens']}   "
          f"load average before/after: {load_before[0]:.1f}/{result['loadavg_1_5_15_after'][0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
