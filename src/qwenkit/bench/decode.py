"""Single-stream decode and prefill, side by side: qwenkit vs llama.cpp vs transformers.

All three engines get the same GGUF file, the same token ids (HumanEval text, tokenized once by
the parent process) and the same thread count. Each engine runs in its own subprocess, so its
peak RSS is its own and one engine's allocations never slow another's.

Measured per engine (median of `repeats` runs):
- ``prefill[n]`` tok/s and ``ttft[n]`` s: time from submitting an n-token prompt to the logits
  of its last token (logits only for that token in every engine; transformers with
  ``logits_to_keep=1``, as its `generate` does);
- ``decode`` tok/s: greedy, one sequence, `decode_tokens` new tokens after a 64-token prompt,
  counted from the first generated token to the last;
- peak RSS (``ru_maxrss``, load included) and steady RSS after the runs, and the peak RSS
  reached by the end of each prefill length (``prefill_peak_rss_mb``: it only grows, so the
  step from one length to the next is what that prompt needed).

Long prompts (``--prefill 8192,16384``): qwenkit prefills in chunks of
``--max-num-batched-tokens`` (default 2048) through its paged cache, whose attention kernel
never builds a T x T score matrix; llama.cpp in its ``n_batch`` 512 chunks. transformers (eager
attention: a T x T score matrix per head) skips prompts over 4096 tokens.

Engines:
- ``qwenkit``: `qwenkit.loaders.load.load(..., quantization=Q)` and the serving engine
  (`LLMEngine`: paged KV cache, scheduler, sampler), as a user gets it; ``--kv-cache-dtype int8``
  stores its KV cache in int8.
- ``llama.cpp``: `llama_cpp.Llama` (PyPI `llama-cpp-python`, built from source at install:
  `pip install 'qwenkit[bench]'`; a first build takes ~20-30 min on this 2-core machine).
- ``transformers``: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (the GGUF
  dequantized to fp32), eager attention, `DynamicCache`.

The machine is shared and its speed drifts by tens of percent over minutes: the load average
is recorded before and after each engine, and ``--rounds N`` runs the engines N times
interleaved (A B C A B C ...) and keeps each engine's best round per metric, so every engine
gets the same chances at a quiet machine (all rounds stay in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from qwenkit.cpu.allocator import peak_resident_bytes, resident_bytes
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.loaders.load import load, load_tokenizer, resolve
from qwenkit.loaders.catalog import DEFAULT_MODEL
from qwenkit.quant.policy import method_names
from qwenkit.quant.quality import humaneval_text
from qwenkit.sampling_params import SamplingParams

ENGINES = ("qwenkit", "llama.cpp", "transformers")
DEFAULT_PREFILL = (128, 512, 2048)
DECODE_PROMPT = 64
BATCH_PROMPT = 32  # prompt tokens per sequence in the batched decode
DEFAULT_BATCH = (1, 4, 16, 64)
DEFAULT_PREFILL_CHUNK = 2048  # qwenkit's max_num_batched_tokens for the single-stream runs
TRANSFORMERS_MAX_PREFILL = 4096  # eager attention's (T, T) scores per head: 16K would need ~14 GB


@dataclass
class EngineResult:
    engine: str
    model: str
    threads: int
    config: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    prefill_tps: dict[str, float] = field(default_factory=dict)
    ttft_s: dict[str, float] = field(default_factory=dict)
    decode_tps: float = 0.0
    decode_tokens: int = 0
    batch_tps: dict[str, float] = field(default_factory=dict)  # B -> aggregate decode tok/s
    peak_rss_mb: float = 0.0
    prefill_peak_rss_mb: dict[str, float] = field(default_factory=dict)  # n -> peak RSS after prefill@n
    rss_mb: float = 0.0
    loadavg_before: float = 0.0
    loadavg_after: float = 0.0
    error: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)  # every round's raw figures


def best_of(rounds: Sequence[EngineResult]) -> EngineResult:
    """One engine's rounds -> its best figure per metric (max tok/s, min TTFT, max RSS)."""
    ok = [r for r in rounds if not r.error]
    if not ok:
        return rounds[-1]
    best = EngineResult(**{k: v for k, v in asdict(ok[0]).items() if k != "rounds"})
    best.decode_tps = max(r.decode_tps for r in ok)
    for b in ok[0].batch_tps:
        best.batch_tps[b] = max(r.batch_tps.get(b, 0.0) for r in ok)
    for n in ok[0].prefill_tps:
        best.prefill_tps[n] = max(r.prefill_tps.get(n, 0.0) for r in ok)
        best.ttft_s[n] = min(r.ttft_s.get(n, float("inf")) for r in ok)
    best.peak_rss_mb = max(r.peak_rss_mb for r in ok)
    for n in ok[0].prefill_peak_rss_mb:
        best.prefill_peak_rss_mb[n] = max(r.prefill_peak_rss_mb.get(n, 0.0) for r in ok)
    best.loadavg_before = ok[0].loadavg_before
    best.loadavg_after = ok[-1].loadavg_after
    best.rounds = [asdict(r) for r in rounds] if len(rounds) > 1 else []
    return best


def _median_time(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


# ------------------------------------------------------------------------------------ engines
class QwenkitEngine:
    """qwenkit's serving engine (`LLMEngine`, paged KV cache), one request at a time for the
    single-stream figures; prefill in chunks of `chunk` tokens (a prompt up to that long in one),
    without prefix caching (the bench repeats its prompts)."""

    def __init__(
        self, model: str, quantization: str, max_len: int, kv_cache_dtype: str = "auto",
        chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.lm = load(model, quantization=quantization, progress=False)
        self.kv_cache_dtype = kv_cache_dtype
        # no prefix caching: every timed prefill computes its whole prompt
        self.engine = LLMEngine(self.lm.model, self.lm.tokenizer, max_num_seqs=1, max_model_len=max_len,
                                max_num_batched_tokens=min(max_len, chunk), enable_prefix_caching=False,
                                kv_cache_dtype=kv_cache_dtype)  # fmt: skip
        self.config = {"quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
                       "max_num_batched_tokens": min(max_len, chunk),
                       "spec": getattr(getattr(self.lm.model, "quant_policy", None), "spec", "fp32")}  # fmt: skip

    def _run(self, ids: list[int], n: int) -> tuple[float, float]:
        """Greedy, `n` tokens: (seconds to the first token, seconds for the other n - 1)."""
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        self.engine.add_request("bench", {"prompt_token_ids": ids}, params)
        t1 = None
        steps = 0
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            steps += 1
            # the first token: a chunked prefill takes several steps before it
            if t1 is None and any(o.outputs and o.outputs[0].token_ids for o in outs):
                t1 = time.perf_counter()
                self.steps_to_first_token = steps
        return t1 - t0, time.perf_counter() - t1

    def prefill(self, ids: list[int]) -> float:
        return self._run(ids, 1)[0]

    def decode(self, ids: list[int], n: int) -> float:
        """Seconds per token for tokens 2..n (the first comes from the prefill)."""
        return self._run(ids, n)[1] / (n - 1)

    def decode_batch(self, prompts: list[list[int]], n: int) -> float:
        """Seconds per step of len(prompts) sequences decoding together through the serving
        engine (paged KV cache, continuous batching), counted once every sequence is past its
        prefill."""
        b = len(prompts)
        engine = LLMEngine(self.lm.model, self.lm.tokenizer, max_num_seqs=b,
                           max_model_len=max(map(len, prompts)) + n + 8, kv_cache_dtype=self.kv_cache_dtype)  # fmt: skip
        params = SamplingParams(temperature=0.0, max_tokens=n + 2, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"b{i}", p, params)
        started: set[str] = set()
        while len(started) < b:  # every prefill done (they may take several chunked steps)
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        return (time.perf_counter() - t0) / n


class LlamaCppEngine:
    def __init__(self, model: str, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        path = _gguf_path(model)
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False,
        )  # fmt: skip
        import llama_cpp

        self.threads = threads

        self.config = {"llama_cpp_python": llama_cpp.__version__, "n_batch": 512,
                       "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}  # fmt: skip

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        gen = self.llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # prefill + first token
        t0 = time.perf_counter()
        for _ in range(n - 1):
            next(gen)
        dt = time.perf_counter() - t0
        gen.close()
        return dt / (n - 1)

    def decode_batch(self, prompts: list[list[int]], n: int) -> float:
        """Seconds per `llama_decode` of one batch holding the next token of every sequence
        (llama.cpp's parallel decoding, as llama-server and batched-bench run it: one context,
        one sequence id per stream), greedy, after one batch with all the prompts."""
        import numpy as np

        import llama_cpp as L

        b, plen = len(prompts), max(map(len, prompts))
        cp = L.llama_context_default_params()
        cp.n_ctx = b * (plen + n + 8)
        cp.n_batch, cp.n_ubatch = max(512, b * plen), 512  # all prompts in one llama_decode
        cp.n_seq_max = b
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.llm._model.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp: could not create a batched context")
        batch = L.llama_batch_init(max(b * plen, b), 0, 1)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.llm._model.model))
        try:
            def submit(items: list[tuple[int, int, int, bool]]) -> None:
                batch.n_tokens = len(items)
                for i, (tok, pos, seq, want) in enumerate(items):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, want
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def argmax(i: int) -> int:
                return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

            items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
            submit(items)
            toks = [argmax(i) for i, it in enumerate(items) if it[3]]
            pos = [len(p) for p in prompts]
            t0 = time.perf_counter()
            for step in range(n):
                submit([(toks[s], pos[s] + step, s, True) for s in range(b)])
                toks = [argmax(s) for s in range(b)]
            return (time.perf_counter() - t0) / n
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)


class TransformersEngine:
    def __init__(self, model: str) -> None:
        import torch
        import transformers

        path = _gguf_path(model)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.config = {"transformers": transformers.__version__, "dtype": "float32", "attn": "sdpa"}

    def prefill(self, ids: list[int]) -> float:
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> float:
        torch = self.torch
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache()
            out = self.model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = self.model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / (n - 1)

    def decode_batch(self, prompts: list[list[int]], n: int) -> float:
        """Seconds per step of the sequences as one (B, 1) batch with a shared DynamicCache
        (equal prompt lengths: no padding)."""
        torch = self.torch
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache()
            out = self.model(torch.tensor(prompts), past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / n


def _gguf_path(model: str) -> Path:
    src = resolve(model)
    if src.format != "gguf":
        raise ValueError(f"{model}: the side-by-side bench needs a GGUF model (got {src.format})")
    return src.path


# ------------------------------------------------------------------------------------- worker
def run_worker(engine: str, args: argparse.Namespace, token_ids: list[int]) -> EngineResult:
    import torch

    torch.set_num_threads(args.threads)
    res = EngineResult(engine, args.model, args.threads, loadavg_before=os.getloadavg()[0])
    t0 = time.perf_counter()
    max_len = max([*args.prefill, DECODE_PROMPT + args.decode_tokens, BATCH_PROMPT + args.batch_steps]) + 16
    if engine == "qwenkit":
        eng: Any = QwenkitEngine(args.model, args.quantization, max_len, args.kv_cache_dtype,
                                 args.max_num_batched_tokens)  # fmt: skip
    elif engine == "llama.cpp":
        eng = LlamaCppEngine(args.model, args.threads, max_len)
    elif engine == "transformers":
        eng = TransformersEngine(args.model)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    res.load_s = time.perf_counter() - t0
    res.config = eng.config
    if args.decode_tokens > 1 and args.mode in ("decode", "all"):
        eng.decode(token_ids[:DECODE_PROMPT], 8)  # warm-up (compile, allocator, caches)
        spt = _median_time(lambda: eng.decode(token_ids[:DECODE_PROMPT], args.decode_tokens), args.repeats)
        res.decode_tps, res.decode_tokens = 1.0 / spt, args.decode_tokens
    if args.mode in ("batch", "all") and args.batch:
        for b in args.batch:
            # B different prompts of BATCH_PROMPT tokens (windows of the bench text)
            prompts = [token_ids[i : i + BATCH_PROMPT] for i in range(b)]
            eng.decode_batch(prompts, 2)  # warm-up
            spt = _median_time(lambda: eng.decode_batch(prompts, args.batch_steps), max(1, args.repeats - 1))
            res.batch_tps[str(b)] = b / spt
    if args.mode in ("prefill", "all"):
        eng.prefill(token_ids[: min(*args.prefill, 512)])  # warm-up (not a whole 16K prompt)
        for n in sorted(args.prefill):
            if engine == "transformers" and n > TRANSFORMERS_MAX_PREFILL:
                continue
            reps = args.repeats if n <= 512 else max(1, args.repeats - 1)
            t = _median_time(lambda: eng.prefill(token_ids[:n]), reps)
            res.prefill_tps[str(n)], res.ttft_s[str(n)] = n / t, t
            res.prefill_peak_rss_mb[str(n)] = peak_resident_bytes() / 1e6
    res.peak_rss_mb, res.rss_mb = peak_resident_bytes() / 1e6, resident_bytes() / 1e6
    res.loadavg_after = os.getloadavg()[0]
    return res


# ------------------------------------------------------------------------------------- parent
def bench_tokens(model: str, n: int) -> list[int]:
    ids = load_tokenizer(model).encode(humaneval_text())
    if len(ids) < n:
        raise ValueError(f"bench text has {len(ids)} tokens, {n} needed")
    return ids[:n]


def _spawn(engine: str, args: argparse.Namespace, ids_file: str) -> EngineResult:
    cmd = [sys.executable, "-m", "qwenkit.bench.decode", "--worker", engine, "--ids-file", ids_file,
           *_forward_args(args)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return EngineResult(**json.loads(line))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return EngineResult(engine, args.model, args.threads, error=" | ".join(tail) or f"exit {proc.returncode}")


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = [args.model, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--decode-tokens", str(args.decode_tokens), "--prefill", ",".join(map(str, args.prefill)),
           "--quantization", args.quantization, "--mode", args.mode,
           "--batch", ",".join(map(str, args.batch)), "--batch-steps", str(args.batch_steps),
           "--kv-cache-dtype", args.kv_cache_dtype, "--max-num-batched-tokens", str(args.max_num_batched_tokens)]  # fmt: skip
    return out


def format_report(results: Sequence[EngineResult]) -> str:
    by = {r.engine: r for r in results}
    ours = by.get("qwenkit")
    cols = ["decode"] if any(r.decode_tps for r in results) else []
    cols += [f"batch@{b}" for b in sorted({int(k) for r in results for k in r.batch_tps})]
    cols += [f"prefill@{n}" for n in sorted({int(k) for r in results for k in r.prefill_tps})]

    def val(r: EngineResult, c: str) -> float:
        if c == "decode":
            return r.decode_tps
        kind, n = c.split("@")
        return (r.batch_tps if kind == "batch" else r.prefill_tps).get(n, 0.0)

    lines = ["| engine | " + " | ".join(f"{c} tok/s" for c in cols)
             + " | TTFT@512 s | peak RSS MB | load avg |",
             "|---|" + "---|" * (len(cols) + 3)]  # fmt: skip
    for r in results:
        if r.error:
            lines.append(f"| {r.engine} | error: {r.error} |")
            continue
        cells = [f"{val(r, c):.1f}" if val(r, c) else "–" for c in cols]
        ttft = r.ttft_s.get("512")
        lines.append(
            f"| {r.engine} | " + " | ".join(cells)
            + f" | {ttft:.2f} |" if ttft else f"| {r.engine} | " + " | ".join(cells) + " | – |"
        )
        lines[-1] += f" {r.peak_rss_mb:.0f} | {r.loadavg_before:.1f}→{r.loadavg_after:.1f} |"
    if ours and not ours.error:
        for other in results:
            if other.engine == "qwenkit" or other.error:
                continue
            ratios = []
            for c in cols:
                a, b = val(ours, c), val(other, c)
                ratios.append(f"{a / b:.2f}×" if a and b else "–")
            lines.append(f"| qwenkit / {other.engine} | " + " | ".join(ratios) + " | | | |")
    rss = [r for r in results if r.prefill_peak_rss_mb and not r.error]
    if rss:
        lens = sorted({int(n) for r in rss for n in r.prefill_peak_rss_mb})
        lines += ["", "| engine | " + " | ".join(f"peak RSS MB after prefill@{n}" for n in lens) + " |",
                  "|---|" + "---|" * len(lens)]  # fmt: skip
        for r in rss:
            cells = [f"{r.prefill_peak_rss_mb[str(n)]:.0f}" if str(n) in r.prefill_peak_rss_mb else "–" for n in lens]
            lines.append(f"| {r.engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> list[EngineResult]:
    n = max([*args.prefill, DECODE_PROMPT + args.decode_tokens])
    ids = bench_tokens(args.model, n)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
        ids_file = f.name
    rounds: dict[str, list[EngineResult]] = {e: [] for e in args.engines}
    try:
        for i in range(args.rounds):
            for engine in args.engines:
                tag = f" (round {i + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(f"[bench] {engine}{tag} …", file=sys.stderr, flush=True)
                rounds[engine].append(_spawn(engine, args, ids_file))
    finally:
        os.unlink(ids_file)
    results = [best_of(rs) for rs in rounds.values()]
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name or .gguf path")
    p.add_argument("--engines", default=",".join(ENGINES), type=lambda s: [e.strip() for e in s.split(",") if e.strip()])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the engines this many times interleaved; report each one's best round")  # fmt: skip
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill", default=",".join(map(str, DEFAULT_PREFILL)),
                   type=lambda s: [int(x) for x in str(s).split(",") if x])  # fmt: skip
    p.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCH)),
                   type=lambda s: [int(x) for x in str(s).split(",") if x],
                   help="batch sizes for the aggregate decode (modes batch and all; '' = none)")  # fmt: skip
    p.add_argument("--batch-steps", type=int, default=24, help="timed decode steps per batch size")
    p.add_argument("--quantization", "-q", default="auto", help=f"{', '.join(method_names())} or a policy spec")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="qwenkit's prefill chunk (tokens per engine step) for long prompts")  # fmt: skip
    from qwenkit.engine.kv_cache import add_kv_cache_dtype_arg

    add_kv_cache_dtype_arg(p)
    p.add_argument("--json", default=None, help="write all results here")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--mode", choices=["decode", "batch", "prefill", "all"], default="all")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        ids = json.loads(Path(args.ids_file).read_text())
        try:
            res = run_worker(args.worker, args, ids)
        except Exception as e:  # reported in the table, not a crash of the whole run
            res = EngineResult(args.worker, args.model, args.threads, error=f"{type(e).__name__}: {e}")
        print(json.dumps(asdict(res)), flush=True)
        return 0
    results = run_bench(args)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
