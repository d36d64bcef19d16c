"""`qwenkit` command line: pull, list, generate, chat, export."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Sequence

from qwenkit.errors import QwenkitError

logger = logging.getLogger("qwenkit")


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def add_model_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")
    else:
        p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation config)")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-tokens", "-n", type=int, default=512)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace, generation_defaults: dict[str, Any]) -> Any:
    from qwenkit.sampling_params import SamplingParams

    return SamplingParams.from_generation_config(
        generation_defaults,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos or None,
    )


def cmd_pull(args: argparse.Namespace) -> int:
    from qwenkit.loaders.resolve import ensure_model_file

    path = ensure_model_file(args.name)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qwenkit.loaders.catalog import list_models

    for entry in list_models():
        print(entry)
    return 0


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", default=None, help='bytes or e.g. "2GiB"')
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per engine step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step (prefill chunk)")
    from qwenkit.engine.kv_cache import add_kv_cache_dtype_arg
    from qwenkit.engine.llm_engine import add_streaming_args

    add_kv_cache_dtype_arg(g)
    add_streaming_args(g)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--quantization", "-q", default="auto",
                   help="runtime weight format: auto (= int8, see qwenkit.quant.policy), none (fp32), int8, "
                        "int4, mixed, ... (`qwenkit eval quant` compares them)")
    g.add_argument("--lora", default=None, metavar="PATH",
                   help="LoRA adapter folder (peft format) merged into the weights at load, before quantizing")
    from qwenkit.loaders.load import add_rope_scaling_arg

    add_rope_scaling_arg(g)
    from qwenkit.engine.spec_decode import add_speculative_args

    add_speculative_args(p)
    from qwenkit.engine.parallel import add_parallel_args
    from qwenkit.model.dca import add_dual_chunk_arg

    add_parallel_args(g)
    add_dual_chunk_arg(g)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from qwenkit.engine.spec_decode import speculative_config_from_args

    out = {
        "max_model_len": args.max_model_len,
        "kv_cache_memory": args.kv_cache_memory,
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", None),
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "streaming_window": args.streaming_window,
        "num_sink_tokens": args.num_sink_tokens,
        "speculative_config": speculative_config_from_args(args),
        "dual_chunk_attention": getattr(args, "dual_chunk_attention", None),
    }
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name, 1) > 1:
            out[name] = getattr(args, name)
    if getattr(args, "pp_micro_batches", None) is not None:
        out["pp_micro_batches"] = args.pp_micro_batches
    return {k: v for k, v in out.items() if v is not None}


class _Generator:
    """One streamed request at a time through the engine."""

    def __init__(self, args: argparse.Namespace, progress: bool = True) -> None:
        from qwenkit.engine.llm import LLM
        from qwenkit.loaders.load import load

        from qwenkit.engine.parallel import tp_quantization

        _threads(args.threads)
        quantization = tp_quantization(args.quantization, args.tensor_parallel_size * args.pipeline_parallel_size)
        self.lm = load(args.model, progress=progress, quantization=quantization, lora=args.lora,
                       rope_scaling=args.rope_scaling)
        self.llm = LLM(self.lm, **engine_kwargs(args))

    def stream(self, prompt_ids: list[int], params: Any) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Yield (text delta, None) while running, then ("", final) with text/token_ids/usage."""
        t0 = time.perf_counter()
        text, ids, reason = "", [], None
        for out in self.llm.stream({"prompt_token_ids": prompt_ids}, params):
            o = out.outputs[0]
            text += o.text
            ids += o.token_ids
            reason = o.finish_reason or reason
            yield o.text, None
        yield "", {"text": text, "token_ids": ids, "finish_reason": reason,
                   "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                             "total_tokens": len(prompt_ids) + len(ids)},
                   "seconds": time.perf_counter() - t0}


def _prompt_ids(tokenizer: Any, item: dict[str, Any], chat: bool, system: str | None) -> list[int]:
    if "prompt_token_ids" in item:
        return list(item["prompt_token_ids"])
    if "messages" in item:
        return tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
    if "prompt" not in item:
        raise ValueError(f"input line needs 'prompt', 'messages' or 'prompt_token_ids': {item!r}")
    if chat:
        messages = [{"role": "user", "content": item["prompt"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(item["prompt"])


def cmd_generate_batch(args: argparse.Namespace) -> int:
    from qwenkit.engine.llm import LLM
    from qwenkit.loaders.load import load

    _threads(args.threads)
    lm = load(args.model, quantization=args.quantization, lora=args.lora, rope_scaling=args.rope_scaling)
    items = []
    with open(args.input, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.input}:{n}: invalid JSON ({e})") from None
    prompts = [{"prompt_token_ids": _prompt_ids(lm.tokenizer, it, args.chat, args.system)} for it in items]
    params = sampling_params(args, lm.generation_defaults)
    outputs = LLM(lm, **engine_kwargs(args)).generate(prompts, params)
    with open(args.output, "w", encoding="utf-8") as f:
        for it, out in zip(items, outputs):
            o = out.outputs[0]
            record = {
                "id": it.get("id"),
                "text": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "usage": {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(o.token_ids),
                          "total_tokens": len(out.prompt_token_ids) + len(o.token_ids)},
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("wrote %d results to %s", len(outputs), args.output)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.input:
        if not args.output:
            raise ValueError("--input needs --output")
        return cmd_generate_batch(args)
    gen = _Generator(args, progress=not args.json)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    prompt_ids = _prompt_ids(gen.lm.tokenizer, {"prompt": prompt}, args.chat, args.system)
    params = sampling_params(args, gen.lm.generation_defaults)
    final: dict[str, Any] = {}
    for delta, done in gen.stream(prompt_ids, params):
        if not args.json and delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
        final = done or final
    if args.json:
        print(json.dumps({k: final[k] for k in ("text", "token_ids", "finish_reason", "usage")}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        u, dt = final["usage"], final["seconds"]
        logger.info(
            "%d prompt + %d generated tokens, %.1f tok/s (finish: %s)",
            u["prompt_tokens"], u["completion_tokens"], u["completion_tokens"] / dt if dt else 0.0,
            final["finish_reason"],
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    gen = _Generator(args)
    tok = gen.lm.tokenizer
    params = sampling_params(args, gen.lm.generation_defaults)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print("qwenkit chat — /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            user = input("\n>>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history = list(system)
            print("(history cleared)")
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        prompt_ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        reply = ""
        stream = gen.stream(prompt_ids, params)
        try:
            for delta, _ in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
                reply += delta
        except KeyboardInterrupt:
            stream.close()  # aborts the request; its KV blocks go back to the pool
            print("\n(stopped)")
        history.append({"role": "assistant", "content": reply})
        print()


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from qwenkit.loaders.hf import export_hf
    from qwenkit.loaders.load import load

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    lm = load(args.model)
    out = export_hf(lm.model, args.out_dir, tokenizer=lm.tokenizer, generation=lm.generation_defaults, dtype=dtype)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="qwenkit", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("QWENKIT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download and verify a registry model")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="list registry models")
    p.set_defaults(func=cmd_list)

    for name, func, helptext in (
        ("generate", cmd_generate, "generate a completion (streamed)"),
        ("chat", cmd_chat, "interactive multi-turn chat"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_model_arg(p)
        if name == "generate":
            p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: stdin)")
            p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
            p.add_argument("--json", action="store_true", help="print one JSON object at the end")
            p.add_argument("--input", default=None, help="JSONL of {prompt|messages|prompt_token_ids} for batch inference")
            p.add_argument("--output", default=None, help="JSONL results for --input")
        p.add_argument("--system", default=None, help="system prompt (chat)")
        add_engine_args(p)
        add_sampling_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="write an HF folder (safetensors + config + tokenizer)")
    add_model_arg(p, positional=True)
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export)

    _add_optional_subcommands(sub)
    return parser


def _add_optional_subcommands(sub: Any) -> None:
    """Subcommands owned by other packages (serve, eval, quantize, bench, train, data)."""
    from qwenkit.bench.cli import add_bench_parser
    from qwenkit.cli.data import add_data_parser
    from qwenkit.eval.cli import add_eval_parser
    from qwenkit.cli.long import add_summarize_parser
    from qwenkit.cli.quantize import add_quantize_parser
    from qwenkit.serve.cli import add_serve_parser
    from qwenkit.train.cli import add_train_parser

    add_serve_parser(sub)
    add_eval_parser(sub)
    add_quantize_parser(sub)
    add_bench_parser(sub)
    add_train_parser(sub)
    add_data_parser(sub)
    add_summarize_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        # `key=value` settings may follow options (argparse takes positionals only once)
        if args.model and "=" in args.model:
            args.overrides.insert(0, args.model)
            args.model = None
        args.overrides += [u for u in unknown if "=" in u and not u.startswith("-")]
        unknown = [u for u in unknown if not ("=" in u and not u.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except QwenkitError as e:
        logger.error("%s", e)
        return 2
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
