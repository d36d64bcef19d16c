"""`qwenkit` command line: pull, list, generate, chat, export."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from qwenkit.errors import QwenkitError

logger = logging.getLogger("qwenkit")


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def add_model_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    from qwenkit.loaders.registry import DEFAULT_MODEL

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
    from qwenkit.loaders.registry import ensure_model_file

    path = ensure_model_file(args.name)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qwenkit.loaders.registry import list_models

    for entry in list_models():
        print(entry)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qwenkit.generate import generate_stream
    from qwenkit.loaders.load import load

    _threads(args.threads)
    lm = load(args.model, progress=not args.json)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = lm.tokenizer.encode(prompt)
    params = sampling_params(args, lm.generation_defaults)
    final = None
    for ev in generate_stream(lm.model, lm.tokenizer, prompt_ids, params, lm.config.eos_token_ids):
        if not args.json and ev.delta:
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
        final = ev
    assert final is not None
    if args.json:
        print(
            json.dumps(
                {
                    "text": final.text,
                    "token_ids": final.token_ids,
                    "finish_reason": final.finish_reason,
                    "usage": {k: v for k, v in final.usage.items() if k != "seconds"},
                },
                ensure_ascii=False,
            )
        )
    else:
        sys.stdout.write("\n")
        u = final.usage
        tps = u["completion_tokens"] / u["seconds"] if u["seconds"] else 0.0
        logger.info(
            "%d prompt + %d generated tokens, %.1f tok/s (finish: %s)",
            u["prompt_tokens"], u["completion_tokens"], tps, final.finish_reason,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qwenkit.generate import generate_stream
    from qwenkit.loaders.load import load

    _threads(args.threads)
    lm = load(args.model)
    params = sampling_params(args, lm.generation_defaults)
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
        prompt = lm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = ""
        try:
            for ev in generate_stream(
                lm.model, lm.tokenizer, lm.tokenizer.encode(prompt), params, lm.config.eos_token_ids
            ):
                sys.stdout.write(ev.delta)
                sys.stdout.flush()
                reply += ev.delta
        except KeyboardInterrupt:
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
    from qwenkit.loaders.registry import DEFAULT_MODEL

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
        p.add_argument("--system", default=None, help="system prompt (chat)")
        p.add_argument("--threads", type=int, default=None)
        add_sampling_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="write an HF folder (safetensors + config + tokenizer)")
    add_model_arg(p, positional=True)
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
