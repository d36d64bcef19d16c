"""`qwenkit eval humaneval|mbpp|ppl|passkey ...` — registered by the main CLI via `add_eval_parser`."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("qwenkit.eval")

_DTYPES = ("float32", "bfloat16", "float16")


def _load(args: argparse.Namespace) -> Any:
    import torch

    from qwenkit.loaders.load import load

    from qwenkit.model.dca import enable_dual_chunk_attention

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    loaded = load(
        args.model, dtype=getattr(torch, args.dtype), progress=not args.no_progress, quantization=args.quantization,
        rope_scaling=getattr(args, "rope_scaling", None),
    )
    enable_dual_chunk_attention(loaded.model, getattr(args, "dual_chunk_attention", None))
    return loaded


def _runtime(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "format": loaded.source.format,
        "weights": Path(loaded.source.path).name,
        "dtype": args.dtype,
        "quantization": _quant_label(loaded, args),
        "device": str(next(loaded.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "load_seconds": round(loaded.load_seconds, 2),
    }


def _quant_label(loaded: Any, args: argparse.Namespace) -> str:
    """The runtime weight format actually used (``auto`` resolved; a quantized checkpoint as stored)."""
    policy = getattr(loaded.model, "quant_policy", None)
    return policy.spec if policy is not None and policy.is_quantized else "none"


def _default_samples_path(args: argparse.Namespace, model_name: str) -> Path:
    if args.output:
        out = Path(args.output)
        return out.with_name(out.stem + ".samples.jsonl")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    return Path("qwenkit-eval") / f"{slug}-{args.benchmark}-{args.protocol}.samples.jsonl"


def cmd_codegen(args: argparse.Namespace) -> int:
    from qwenkit.eval.generation import EngineGenerator, SampleStore
    from qwenkit.eval.harness import RunConfig, run_codegen_eval
    from qwenkit.eval.humaneval import HumanEval
    from qwenkit.eval.mbpp import MbppPlus
    from qwenkit.eval.protocols import get_protocol
    from qwenkit.eval.report import format_table, published_scores, write_json
    from qwenkit.eval.sandbox import isolation

    protocol = get_protocol(args.protocol)
    config = RunConfig(
        protocol, n=args.n, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        max_tokens=args.max_tokens, ks=tuple(args.k),
    )  # fmt: skip
    if args.benchmark == "humaneval":
        bench: Any = HumanEval(timeout_s=args.timeout)
    else:
        bench = MbppPlus(args.mbpp_path, timeout_s=args.timeout)
    task_ids = list(bench.problems)
    if args.task_ids:
        unknown = sorted(set(args.task_ids) - set(task_ids))
        if unknown:
            raise SystemExit(f"unknown task ids for {args.benchmark}: {unknown}")
        task_ids = [t for t in task_ids if t in set(args.task_ids)]
    if args.limit:
        task_ids = task_ids[: args.limit]

    loaded = _load(args)
    model_name = loaded.source.name or str(args.model)
    samples_path = Path(args.samples) if args.samples else _default_samples_path(args, model_name)
    meta = {**config.meta(args.benchmark, model_name, task_ids), "quantization": _quant_label(loaded, args)}
    store = SampleStore(samples_path, meta, overwrite=args.overwrite)
    engine_args: dict[str, Any] = {"max_model_len": protocol.max_model_len or args.max_model_len}
    if args.max_num_seqs:
        engine_args["max_num_seqs"] = args.max_num_seqs
    if args.kv_cache_memory:
        engine_args["kv_cache_memory"] = args.kv_cache_memory

    def build() -> Any:
        return EngineGenerator(loaded, **engine_args)

    result = run_codegen_eval(bench, loaded.tokenizer, build, store, config, task_ids, args.workers, not args.no_progress)
    result = {
        "model": model_name,
        **result,
        "limit": args.limit,
        "published": published_scores(model_name),
        "runtime": _runtime(loaded, args),
        "sandbox": isolation(),
        "samples_file": str(samples_path),
        "notes": [
            "pass@1 is a percentage over the base tests"
            + ("; HumanEval+ is not reported (its data is not available offline)" if args.benchmark == "humaneval"
               else "; plus.pass@1 counts base + plus tests (evalplus MBPP+)"),  # fmt: skip
        ],
    }
    print(format_table(result))
    if args.output:
        print(f"results: {write_json(result, args.output)}")
    print(f"samples: {samples_path}")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from qwenkit.eval.perplexity import llama_tokenize, perplexity, sliding_perplexity
    from qwenkit.eval.report import write_json

    text = Path(args.text).read_text(encoding="utf-8")
    loaded = _load(args)
    tok = loaded.tokenizer
    ids = llama_tokenize(tok, text)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None

    def on_chunk(i: int, ppl: float) -> None:
        print(f"[{i + 1}]{ppl:.4f},", end="", flush=True)

    if args.stride is not None:
        logger.info("%d tokens; windows of %d every %d tokens", len(ids), args.ctx, args.stride)
        res = sliding_perplexity(loaded.model, ids, n_ctx=args.ctx, stride=args.stride, on_chunk=on_chunk,
                                 kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
        convention = f"sliding windows of {args.ctx} every {args.stride} tokens, each token scored once"
    else:
        logger.info("%d tokens; %d windows of %d", len(ids), len(ids) // args.ctx, args.ctx)
        res = perplexity(loaded.model, ids, n_ctx=args.ctx, batch_size=args.batch_size, max_chunks=args.chunks,
                         bos_token_id=bos, on_chunk=on_chunk, kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
        convention = "llama.cpp llama-perplexity (second half of each window)"
    print(f"\nFinal estimate: PPL = {res.ppl:.4f} +/- {res.ppl_stderr:.5f}")
    print(
        f"{loaded.source.name}: {res.n_chunks} windows x {res.n_ctx} tokens, {res.n_scored} scored, "
        f"{res.tokens_per_second:.1f} tok/s, {res.seconds:.1f} s ({loaded.source.format} -> {args.dtype})"
    )
    if args.output:
        out = {
            "model": loaded.source.name, "text": str(args.text), "ctx": res.n_ctx, "stride": args.stride,
            "ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "nll": res.nll, "n_chunks": res.n_chunks,
            "n_scored": res.n_scored, "running": res.running, "seconds": res.seconds,
            "tokens_per_second": res.tokens_per_second, "runtime": _runtime(loaded, args), "convention": convention,
            "kv_cache_dtype": args.kv_cache_dtype,
        }  # fmt: skip
        print(f"results: {write_json(out, args.output)}")
    return 0


def _engine_options(p: argparse.ArgumentParser) -> None:
    """Engine flags (vLLM names) for evals that generate through `qwenkit.LLM`."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None, help="default: the longest prompt + max tokens")
    g.add_argument("--kv-cache-memory", default=None, help='KV cache size, e.g. "2GiB"')
    g.add_argument("--max-num-seqs", type=int, default=None, help="concurrent sequences")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="prefill chunk budget per step")
    g.add_argument("--block-size", type=int, default=None)
    from qwenkit.engine.kv_cache import add_kv_cache_dtype_arg
    from qwenkit.engine.llm_engine import add_streaming_args

    add_streaming_args(g)
    add_kv_cache_dtype_arg(g, default=None)  # None: the engine's default (auto)
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other qwenkit.LLM / engine argument (VALUE parsed as JSON when it is JSON); repeatable")  # fmt: skip


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import json

    names = ("max_model_len", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "streaming_window", "num_sink_tokens", "kv_cache_dtype")  # fmt: skip
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    for item in args.engine_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip().replace("-", "_")] = value
    return out


def cmd_passkey(args: argparse.Namespace) -> int:
    from qwenkit.engine.llm import LLM
    from qwenkit.eval.passkey import parse_depths, parse_length, run_passkey
    from qwenkit.eval.report import write_json

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    depths = parse_depths(args.depths)
    kwargs = _engine_kwargs(args)
    kwargs.setdefault("max_model_len", max(lengths) + args.max_tokens)
    loaded = _load(args)
    try:
        llm = LLM(loaded, **kwargs)
    except TypeError as e:  # an unknown engine argument
        raise ValueError(f"engine options {kwargs}: {e}") from None
    res = run_passkey(llm, lengths, depths, args.num_samples, args.seed, args.max_tokens, not args.no_progress)
    model_name = loaded.source.name or str(args.model)
    print(f"passkey retrieval, {model_name} ({_quant_label(loaded, args)}), greedy; engine: {kwargs}")
    print(res.table())
    if args.output:
        out = {"model": model_name, **res.to_json(), "num_samples": args.num_samples, "seed": args.seed,
               "engine_args": kwargs, "runtime": _runtime(loaded, args)}  # fmt: skip
        print(f"results: {write_json(out, args.output)}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")
    p.add_argument("--output", "-o", default=None, help="write the results JSON here")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="compute dtype of the weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quantization", "-q", default="auto",
                   help="runtime weight format: auto (= int8, see qwenkit.quant.policy), none (fp32-dequantized), "
                        "int8, int4, mixed, ...")  # fmt: skip
    from qwenkit.loaders.load import add_rope_scaling_arg

    add_rope_scaling_arg(p)
    from qwenkit.model.dca import add_dual_chunk_arg

    add_dual_chunk_arg(p)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` (with `humaneval`, `mbpp`, `ppl`) to the main CLI's subparsers."""
    from qwenkit.eval.humaneval import DEFAULT_TIMEOUT_S
    from qwenkit.eval.mbpp import DEFAULT_TIMEOUT_S as MBPP_TIMEOUT_S
    from qwenkit.eval.protocols import PROTOCOLS

    ev = subparsers.add_parser("eval", help="evaluate: HumanEval, MBPP+, perplexity, passkey retrieval")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    for name, helptext in (("humaneval", "HumanEval (164 problems, base tests)"), ("mbpp", "MBPP+ (399 tasks)")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.set_defaults(func=cmd_codegen, benchmark=name)
        p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="qwen",
                       help="qwen: the maker's ChatML prompt (default); chat-template: the model's own template")  # fmt: skip
        p.add_argument("--limit", type=int, default=None, help="only the first N problems")
        p.add_argument("--task-ids", nargs="+", default=None, help="only these problems")
        p.add_argument("--n", type=int, default=1, help="samples per problem (pass@k); needs --temperature > 0")
        p.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="k values for pass@k")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the protocol)")
        p.add_argument("--top-p", type=float, default=None, help="default 0.95 when sampling")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--max-tokens", type=int, default=None, help="cap new tokens below the protocol's")
        p.add_argument("--samples", default=None, help="resumable samples JSONL (default: next to --output)")
        p.add_argument("--overwrite", action="store_true", help="discard an existing samples file")
        p.add_argument("--max-num-seqs", type=int, default=None, help="engine: concurrent sequences")
        p.add_argument("--max-model-len", type=int, default=4096, help="engine context (chat-template protocol)")
        p.add_argument("--kv-cache-memory", default=None, help="engine: KV cache size, e.g. 4GiB")
        p.add_argument("--workers", type=int, default=None, help="parallel test processes (default: CPU count)")
        if name == "humaneval":
            p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per problem")
        else:
            p.add_argument("--timeout", type=float, default=MBPP_TIMEOUT_S,
                           help="seconds per task, all inputs (per-input limits: max(1 s, 4x canonical))")  # fmt: skip
            p.add_argument("--mbpp-path", default=None, help="MbppPlus .jsonl[.gz] (default: $QWENKIT_MBPP_PLUS, else the packaged copy)")

    from qwenkit.eval.quant_cli import add_eval_quant_parser

    add_eval_quant_parser(sub)  # `qwenkit eval quant`: quality of each weight format vs fp32

    p = sub.add_parser("ppl", help="perplexity of a text file (llama-perplexity convention)")
    _common(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window size (llama-perplexity -c)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding windows of --ctx tokens every STRIDE (< ctx) tokens, each token scored once "
                        "(transformers' convention; for one long text) instead of llama-perplexity's")  # fmt: skip
    from qwenkit.engine.kv_cache import add_kv_cache_dtype_arg

    add_kv_cache_dtype_arg(p, default=None, extra_help="; given, each window runs in 512-token chunks through the "
                           "engine's paged KV cache of that dtype (default: one forward per window, no cache)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("passkey", help="passkey retrieval in garbage text at given lengths and depths")
    _common(p)
    p.add_argument("--lengths", default="4k", help="prompt lengths in tokens, comma-separated (4096, 4k, 8k, ...)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key positions as fractions of the text")
    p.add_argument("--num-samples", type=int, default=1, help="prompts (random keys) per length and depth")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens generated per prompt")
    _engine_options(p)
    p.set_defaults(func=cmd_passkey)
    return ev


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m qwenkit.eval.cli humaneval ...`) until the main CLI has it."""
    parser = argparse.ArgumentParser(prog="qwenkit")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from qwenkit.errors import QwenkitError

    try:
        return int(args.func(args) or 0)
    except (QwenkitError, ValueError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
