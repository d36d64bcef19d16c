"""`qwenkit summarize FILE`: map-reduce summary of a long text file (`qwenkit.long.map_reduce`)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("qwenkit")

DEFAULT_TASK = "Summarize the following text concisely, keeping the key facts."


def cmd_summarize(args: argparse.Namespace) -> int:
    from qwenkit.cli.main import _threads, engine_kwargs, sampling_params
    from qwenkit.engine.llm import LLM
    from qwenkit.loaders.load import load
    from qwenkit.long import map_reduce

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"summarize: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"summarize: {path} is not UTF-8 text ({e})") from None
    _threads(args.threads)
    lm = load(args.model, quantization=args.quantization, lora=args.lora)
    kwargs = engine_kwargs(args)
    # room for a segment, the prompt's wording and the answer
    kwargs.setdefault("max_model_len", args.segment + 256 + args.max_tokens)
    llm = LLM(lm, **kwargs)
    res = map_reduce(llm, text, args.task, segment=args.segment, overlap=args.overlap,
                     sampling_params=sampling_params(args, lm.generation_defaults), use_tqdm=True)  # fmt: skip
    if args.json:
        print(json.dumps({"answer": res.answer, "segments": res.spans, "levels": res.levels,
                          "num_prompts": res.num_prompts, "num_batches": res.num_batches}, ensure_ascii=False))
    else:
        print(res.answer)
        logger.info("%d segments, %d prompts in %d batches", len(res.spans), res.num_prompts, res.num_batches)
    return 0


def add_summarize_parser(sub: Any) -> None:
    from qwenkit.cli.main import add_engine_args, add_model_arg, add_sampling_args

    p = sub.add_parser("summarize", help="summarize a long text file by map-reduce over overlapping segments")
    p.add_argument("file", help="UTF-8 text file")
    add_model_arg(p)
    p.add_argument("--task", default=DEFAULT_TASK, help="the instruction applied to each segment and to the join")
    p.add_argument("--segment", type=int, default=1024, help="segment length in tokens")
    p.add_argument("--overlap", type=int, default=256, help="tokens shared by consecutive segments")
    p.add_argument("--json", action="store_true", help="print the answer, spans and partial answers as JSON")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_summarize)
