"""`qwenkit quantize MODEL --method M --out DIR`: write a quantized checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from qwenkit.loaders.load import load
    from qwenkit.loaders.quantized import save_quantized
    from qwenkit.quant import resolve_method, weight_bytes

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


def add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.catalog import DEFAULT_MODEL
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
