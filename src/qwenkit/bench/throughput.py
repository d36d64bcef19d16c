"""`qwenkit bench throughput`: the engine under a closed-loop workload, beside llama.cpp.

Workload: `num_requests` prompts of random regular-vocabulary token ids, lengths drawn uniformly
from `prompt_len` (an int or a (min, max) pair), each generating exactly `output_len` tokens
(greedy, EOS ignored). At concurrency c at most c requests are in flight; a finished one is
replaced at once. Reported per level: prompt / output / aggregate tokens per second over the
wall time, time to first token (submission -> first token) and inter-token latency
percentiles, peak RSS. llama.cpp (`llama-cpp-python`, same GGUF, same thread count) serves one
sequence at a time, so it runs the same requests sequentially once; the ratio is ours / theirs
on aggregate tokens per second.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any, Sequence, TextIO

import torch

from qwenkit.cpu.allocator import peak_resident_bytes
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.outputs import RequestOutputKind
from qwenkit.loaders.load import load
from qwenkit.sampling_params import SamplingParams

# Token ids drawn for prompts stay below the first control token of Qwen2.5 (151643).
MAX_REGULAR_TOKEN_ID = 151_643


def make_workload(
    num_requests: int, prompt_len: int | tuple[int, int], vocab_size: int, seed: int = 0
) -> list[list[int]]:
    lo, hi = (prompt_len, prompt_len) if isinstance(prompt_len, int) else prompt_len
    rng = random.Random(seed)
    top = min(vocab_size, MAX_REGULAR_TOKEN_ID)
    return [[rng.randrange(top) for _ in range(rng.randint(lo, hi))] for _ in range(num_requests)]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"mean": float(t.mean()), "p50": q[0], "p90": q[1], "p99": q[2]}


def _summary(
    name: str, concurrency: int, prompts: list[list[int]], output_len: int, elapsed: float,
    ttft: list[float], itl: list[float],
) -> dict[str, Any]:  # fmt: skip
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = output_len * len(prompts)
    return {
        "engine": name,
        "concurrency": concurrency,
        "num_requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "duration_s": elapsed,
        "prompt_tok_s": prompt_tokens / elapsed,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles(ttft).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles(itl).items()},
        "peak_rss_mb": peak_resident_bytes() / 1e6,
    }


def bench_engine(
    engine: LLMEngine, prompts: list[list[int]], output_len: int, concurrency: int
) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    pending = list(enumerate(prompts))
    submitted: dict[str, float] = {}
    last_token: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    in_flight = 0
    t0 = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            rid = f"bench-{i}"
            engine.add_request(rid, prompt, params, output_kind=RequestOutputKind.DELTA)
            submitted[rid] = time.perf_counter()
            in_flight += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            n = sum(len(o.token_ids) for o in out.outputs)
            if n:
                if rid in last_token:
                    itl.extend([(now - last_token[rid]) / n] * n)
                else:
                    ttft.append(now - submitted[rid])
                    itl.extend([0.0] * (n - 1))
                last_token[rid] = now
            if out.finished:
                in_flight -= 1
    return _summary("qwenkit", concurrency, prompts, output_len, time.perf_counter() - t0, ttft, itl)


def bench_llama_cpp(
    gguf_path: str, prompts: list[list[int]], output_len: int, n_threads: int
) -> dict[str, Any]:
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + output_len + 8
    llm = llama_cpp.Llama(
        model_path=gguf_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=512, verbose=False
    )
    ttft: list[float] = []
    itl: list[float] = []
    t0 = time.perf_counter()
    for prompt in prompts:
        llm.reset()  # no KV reuse across requests (their prompts are unrelated anyway)
        start = last = time.perf_counter()
        n = 0
        for _token in llm.generate(prompt, temp=0.0, reset=True):
            now = time.perf_counter()
            (itl if n else ttft).append(now - (last if n else start))
            last = now
            n += 1
            if n == output_len:
                break
    return _summary("llama.cpp", 1, prompts, output_len, time.perf_counter() - t0, ttft, itl)


def _gguf_path(model: Any) -> str | None:
    src = getattr(model, "source", None)
    if src is not None and getattr(src, "format", None) == "gguf":
        return str(src.path)
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".gguf"):
        return str(model)
    return None


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['engine']:>9} c={r['concurrency']:<3} n={r['num_requests']:<3} "
        f"prompt {r['prompt_tok_s']:8.1f} tok/s  output {r['output_tok_s']:7.1f} tok/s  "
        f"total {r['total_tok_s']:8.1f} tok/s  TTFT p50/p90/p99 {r['ttft_ms']['p50']:.0f}/"
        f"{r['ttft_ms']['p90']:.0f}/{r['ttft_ms']['p99']:.0f} ms  ITL p50/p90/p99 "
        f"{r['itl_ms']['p50']:.0f}/{r['itl_ms']['p90']:.0f}/{r['itl_ms']['p99']:.0f} ms  "
        f"RSS {r['peak_rss_mb']:.0f} MB"
    )


def run_throughput(
    model: Any,
    num_requests: int = 64,
    concurrency: Sequence[int] = (1, 4, 16, 64),
    prompt_len: int | tuple[int, int] = (128, 512),
    output_len: int = 128,
    out_json: str | os.PathLike[str] | None = None,
    *,
    llama_cpp: bool = True,
    quantization: str = "auto",
    seed: int = 0,
    stream: TextIO | None = None,
    **engine_args: Any,
) -> dict[str, Any]:
    """Benchmark `model` (a spec for `qwenkit.loaders.load.load`, loaded with `quantization`, or a
    LoadedModel) and return (and optionally write as JSON) the results. Extra keyword arguments
    are engine arguments."""
    stream = stream or sys.stdout

    def say(text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    if isinstance(model, (str, os.PathLike)):
        model = load(model, quantization=quantization)
    gguf = _gguf_path(model)
    config = model.config
    prompts = make_workload(num_requests, prompt_len, config.vocab_size, seed)
    max_prompt = max(len(p) for p in prompts)
    engine_args.setdefault("max_model_len", max_prompt + output_len + 1)
    report: dict[str, Any] = {
        "model": config.name,
        "device": str(next(model.model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "quantization": getattr(getattr(model.model, "quant_policy", None), "spec", "none"),
        "workload": {
            "num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len,
            "seed": seed, "concurrency": list(concurrency),
        },
        "engine_args": {k: str(v) for k, v in engine_args.items()},
        "results": [],
    }  # fmt: skip
    for c in concurrency:
        engine = LLMEngine(model.model, model.tokenizer, max_num_seqs=c, **engine_args)
        # Warm-up (allocator, thread pool, RoPE tables) outside the timed region.
        bench_engine(engine, [prompts[0][:16]], 2, 1)
        result = bench_engine(engine, prompts, output_len, c)
        result["engine_stats"] = engine.stats()
        report["results"].append(result)
        say(_line(result))
        del engine

    if llama_cpp:
        report["llama_cpp"] = _run_llama_cpp(gguf, prompts, output_len, say)
        base = report["llama_cpp"].get("total_tok_s")
        if base:
            report["ratio_vs_llama_cpp"] = {
                str(r["concurrency"]): r["total_tok_s"] / base for r in report["results"]
            }
            for c, ratio in report["ratio_vs_llama_cpp"].items():
                say(f"ratio qwenkit/llama.cpp aggregate tok/s at c={c}: {ratio:.2f}x")
    if out_json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(report, f, indent=2)
        say(f"wrote {out_json}")
    return report


def _run_llama_cpp(gguf: str | None, prompts: list[list[int]], output_len: int, say: Any) -> dict[str, Any]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        say("llama.cpp: not installed (pip install -e '.[bench]': a source build, 15-50 min on 2 cores); skipped")
        return {"available": False, "reason": "llama_cpp is not importable"}
    if gguf is None:
        say("llama.cpp: the model is not a GGUF file; skipped")
        return {"available": False, "reason": "model is not a GGUF file"}
    result = bench_llama_cpp(gguf, prompts, output_len, n_threads=torch.get_num_threads())
    say(_line(result))
    return {"available": True, **result}
