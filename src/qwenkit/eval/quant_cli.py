"""`qwenkit eval quant MODEL`: perplexity, top-1 agreement and KL of each quantization method
against the fp32-dequantized model (`qwenkit.quant.quality`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from qwenkit.loaders.catalog import DEFAULT_MODEL
from qwenkit.loaders.load import load
from qwenkit.quant.quality import DEFAULT_METHODS, compare, format_table, humaneval_text, rows_as_dicts


def cmd_eval_quant(args: argparse.Namespace) -> int:
    """Perplexity + top-1 agreement of each method vs the fp32-dequantized model (a table)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for model_spec in args.model:
        lm = load(model_spec, progress=not args.no_progress)
        ids = lm.tokenizer.encode(humaneval_text())
        rows = compare(lm.model, ids, methods=args.methods, n_ctx=args.ctx, n_chunks=args.chunks)
        title = f"{lm.source.name} — HumanEval text, {args.chunks}×{args.ctx} tokens, second halves scored"
        print(format_table(rows, title), flush=True)
        results[lm.source.name] = rows_as_dicts(rows)
        del lm
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def add_eval_quant_parser(eval_subparsers: Any) -> argparse.ArgumentParser:
    p = eval_subparsers.add_parser(
        "quant", help="perplexity and top-1 agreement of each quantization method vs fp32"
    )
    p.add_argument("model", nargs="*", default=[DEFAULT_MODEL], help="one or more models")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   type=lambda s: [m.strip() for m in s.split(";" if ";" in s else ",") if m.strip()],
                   help="comma-separated methods; separate policy specs with ';'")  # fmt: skip
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval_quant)
    return p
