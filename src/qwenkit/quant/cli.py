"""CLI hooks: `qwenkit quantize MODEL --method M --out DIR` and `qwenkit eval quant MODEL`.

The main CLI registers them: ``add_quantize_parser(subparsers)`` on the top-level subparsers and
``add_eval_quant_parser(eval_subparsers)`` on the `eval` command's subparsers.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("qwenkit.quant")


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from qwenkit.loaders.load import load
    from qwenkit.quant import resolve_method, save_quantized, weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    method = resolve_method(args.method)
    lm = load(args.model, progress=not args.no_progress, quantization=method)
    out = save_quantized(lm.model, args.out, tokenizer=lm.tokenizer, generation=lm.generation_defaults)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(
        f"{lm.source.name}: {method} ({lm.model.quant_policy.spec}) -> {out} "
        f"({size / 1e6:.0f} MB on disk, {weight_bytes(lm.model) / 1e6:.0f} MB in memory)"
    )
    return 0


def cmd_eval_quant(args: argparse.Namespace) -> int:
    """Perplexity + top-1 agreement of each method vs the fp32-dequantized model (a table)."""
    import torch

    from qwenkit.loaders.load import load
    from qwenkit.quant.quality import compare, format_table, humaneval_text, rows_as_dicts

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


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.registry import DEFAULT_MODEL
    from qwenkit.quant.policy import method_names

    p = subparsers.add_parser(
        "quantize",
        help="write a quantized checkpoint (safetensors + config with quantization_config)",
        description="Quantize MODEL's weights and write an HF-style folder that `qwenkit` loads "
        "directly, without re-quantizing. --method takes a method name or a policy spec such as "
        "'int4-g32,down_proj=int8,lm_head=int8'.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")
    p.add_argument("--method", default="auto", help=f"one of {', '.join(method_names())} or a spec")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize)
    return p


def add_eval_quant_parser(eval_subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.registry import DEFAULT_MODEL
    from qwenkit.quant.quality import DEFAULT_METHODS

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


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m qwenkit.quant.cli quantize|eval-quant ...``."""
    ap = argparse.ArgumentParser(prog="qwenkit-quant")
    sub = ap.add_subparsers(dest="command", required=True)
    add_quantize_parser(sub)
    add_eval_quant_parser(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
