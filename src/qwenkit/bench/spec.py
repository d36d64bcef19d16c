"""`qwenkit bench spec`: speculative decoding vs plain decoding, single stream, greedy.

Workload: the first `--humaneval` HumanEval prompts (raw code completion) and one code-editing
chat prompt (rewrite a given function with a small change: most of the answer is a copy of the
prompt, where n-gram drafting shines). Modes, one engine each over the same loaded target:
``plain``, ``ngram`` (prompt lookup, k = `--num-speculative-tokens`) and ``draft``
(`--speculative-model`). Greedy decoding, `--max-tokens` new tokens (EOS stops earlier); each
mode runs an untimed warm-up request first.

Reported per mode and prompt: output tokens, decode tok/s ((tokens - 1) / (last token time -
first token time), prefill excluded), acceptance rate and mean acceptance length, and whether
the tokens equal plain decoding's (greedy speculative decoding must not change them). Totals:
decode tok/s over all prompts and the ratio to ``plain``. The CPU flags go into the report.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EDIT_FUNCTION = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` consecutive items."""
    if window <= 0:
        raise ValueError("window must be positive")
    if window > len(values):
        return []
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


def summarize(values, window=3):
    """Min, max and the moving averages of `values`."""
    if not values:
        raise ValueError("values must not be empty")
    return {
        "min": min(values),
        "max": max(values),
        "moving_average": moving_average(values, window),
    }
'''
EDIT_REQUEST = ("Rewrite this code with one small change: rename the parameter `window` to `size` "
                "everywhere. Output the whole code, nothing else.\n\n```python\n" + EDIT_FUNCTION + "```")  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench spec] {msg}", file=sys.stderr, flush=True)


@dataclass
class PromptRun:
    prompt: str
    prompt_tokens: int
    output_tokens: int
    decode_s: float
    decode_tok_s: float
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_acceptance_length: float = 0.0
    same_as_plain: bool | None = None
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class ModeResult:
    mode: str
    speculative_config: dict[str, Any] | None
    runs: list[PromptRun] = field(default_factory=list)
    decode_tok_s: float = 0.0  # all prompts: (tokens - 1 per prompt) / decode seconds
    ratio_to_plain: float = 0.0
    acceptance_rate: float = 0.0
    mean_acceptance_length: float = 0.0


def prompts(tokenizer: Any, num_humaneval: int) -> list[tuple[str, list[int]]]:
    from qwenkit.eval.humaneval import load_problems

    out = []
    for task_id, problem in list(load_problems().items())[:num_humaneval]:
        out.append((task_id, tokenizer.encode(problem["prompt"])))
    text = tokenizer.apply_chat_template([{"role": "user", "content": EDIT_REQUEST}], add_generation_prompt=True, tokenize=False)
    out.append(("code-edit", tokenizer.encode(text)))
    return out


def run_one(engine: Any, ids: list[int], params: Any) -> tuple[list[int], float]:
    """Greedy tokens and the seconds from the first token to the last."""
    engine.add_request("r", {"prompt_token_ids": ids}, params)
    first = last = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            tokens = out.outputs[0].token_ids
            if tokens and first is None:
                first = now
            last = now
    assert first is not None and last is not None
    return list(tokens), last - first


def run_bench(args: argparse.Namespace) -> list[ModeResult]:
    import torch

    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.loaders.load import load
    from qwenkit.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    lm = load(args.model, quantization=args.quantization)
    work = prompts(lm.tokenizer, args.humaneval)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    k = args.num_speculative_tokens
    modes: dict[str, dict[str, Any] | None] = {"plain": None}
    if "ngram" in args.modes:
        modes["ngram"] = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.prompt_lookup_max,
                          "prompt_lookup_min": args.prompt_lookup_min}  # fmt: skip
    if "draft" in args.modes:
        modes["draft"] = {"model": args.speculative_model, "num_speculative_tokens": k, "quantization": args.quantization}
    results: list[ModeResult] = []
    plain_tokens: dict[str, list[int]] = {}
    for mode, spec in modes.items():
        log(f"{mode}: {spec}")
        engine = LLMEngine(lm.model, lm.tokenizer, max_num_seqs=1, kv_cache_memory=args.kv_cache_memory, speculative_config=spec)
        run_one(engine, work[0][1][:32], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        res = ModeResult(mode, {k_: v for k_, v in (spec or {}).items() if k_ != "model" or isinstance(v, str)} or None)
        for name, ids in work:
            before = engine.stats()
            tokens, secs = run_one(engine, ids, params)
            after = engine.stats()
            run = PromptRun(name, len(ids), len(tokens), secs, (len(tokens) - 1) / secs if secs > 0 else 0.0, token_ids=tokens)
            if spec is not None:
                run.drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
                run.draft_tokens = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
                run.accepted_tokens = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
                run.acceptance_rate = run.accepted_tokens / run.draft_tokens if run.draft_tokens else 0.0
                run.mean_acceptance_length = 1 + run.accepted_tokens / run.drafts if run.drafts else 0.0
                run.same_as_plain = tokens == plain_tokens[name]
            else:
                plain_tokens[name] = tokens
            log(f"{mode} {name}: {run.output_tokens} tokens, {run.decode_tok_s:.2f} tok/s, acceptance {run.acceptance_rate:.2f}")
            res.runs.append(run)
        total_s = sum(r.decode_s for r in res.runs)
        res.decode_tok_s = sum(r.output_tokens - 1 for r in res.runs) / total_s if total_s else 0.0
        drafts, dt, acc = (sum(getattr(r, f) for r in res.runs) for f in ("drafts", "draft_tokens", "accepted_tokens"))
        res.acceptance_rate = acc / dt if dt else 0.0
        res.mean_acceptance_length = 1 + acc / drafts if drafts else 0.0
        results.append(res)
        del engine
    for res in results:
        res.ratio_to_plain = res.decode_tok_s / results[0].decode_tok_s if results[0].decode_tok_s else 0.0
    return results


def format_report(results: list[ModeResult], flags: str) -> str:
    lines = [f"CPU flags: {flags}", "",
             f"{'mode':<6} {'prompt':<14} {'tokens':>6} {'tok/s':>7} {'ratio':>6} {'accept':>7} {'mean len':>8} {'same':>5}"]  # fmt: skip
    plain = {r.prompt: r for r in results[0].runs}
    for res in results:
        for r in res.runs:
            ratio = r.decode_tok_s / plain[r.prompt].decode_tok_s if plain[r.prompt].decode_tok_s else 0.0
            same = "" if r.same_as_plain is None else ("yes" if r.same_as_plain else "NO")
            lines.append(f"{res.mode:<6} {r.prompt:<14} {r.output_tokens:>6} {r.decode_tok_s:>7.2f} {ratio:>5.2f}x "
                         f"{r.acceptance_rate:>7.2f} {r.mean_acceptance_length:>8.2f} {same:>5}")  # fmt: skip
        lines.append(f"{res.mode:<6} {'all':<14} {'':>6} {res.decode_tok_s:>7.2f} {res.ratio_to_plain:>5.2f}x "
                     f"{res.acceptance_rate:>7.2f} {res.mean_acceptance_length:>8.2f}")  # fmt: skip
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-instruct", help="target model")
    p.add_argument("--speculative-model", default="qwen2.5-coder-0.5b-instruct", help="draft model (same tokenizer)")
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=3)
    p.add_argument("--modes", default="ngram,draft", help="besides plain: ngram and/or draft")
    p.add_argument("--humaneval", type=int, default=3, help="HumanEval prompts (the code-edit prompt is always added)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--quantization", "-q", default="auto", help="target's and draft's runtime weight format")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="bench-results/spec.json")


def cmd_spec(args: argparse.Namespace) -> int:
    from qwenkit.cpu.build import cpu_flags

    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))))
    results = run_bench(args)
    print(format_report(results, flags))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in results]
        for row in rows:
            for run in row["runs"]:
                run.pop("token_ids")
        path.write_text(json.dumps({"cpu_flags": flags, "threads": args.threads, "model": args.model,
                                    "max_tokens": args.max_tokens, "results": rows}, indent=1))  # fmt: skip
        log(f"wrote {path}")
    return 0
