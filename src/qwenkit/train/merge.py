"""`qwenkit train merge BASE --adapter PATH --out DIR`: a LoRA adapter folded into its base model,
written as a full HF folder (safetensors + config + tokenizer) that `qwenkit serve DIR` and
transformers load like any other checkpoint.

The merge is `qwenkit.loaders.lora` (no peft needed): W += scale * B @ A on the fp32 weights.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_to_hf(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Load `base` (registry name, .gguf, HF folder or hub id) in fp32, merge `adapter` into it
    and export the result to `out_dir` in `dtype`."""
    from qwenkit.loaders.hf import export_hf
    from qwenkit.loaders.load import load

    lm = load(base, dtype=torch.float32, progress=progress, quantization="none", lora=adapter)
    out = export_hf(lm.model, out_dir, tokenizer=lm.tokenizer, generation=lm.generation_defaults, dtype=dtype)
    logger.info("merged %s + %s -> %s", lm.source.name, adapter, out)
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge_to_hf(args.base, args.adapter, args.out, dtype=DTYPES[args.dtype])
    print(out)
    return 0


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``merge`` on `subparsers` (those of ``qwenkit train``)."""
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model and write an HF folder")
    p.add_argument("base", help="base model: registry name, .gguf, HF folder or hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    p.set_defaults(func=cmd_merge)
    return p
