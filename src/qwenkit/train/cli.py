"""`qwenkit train pretrain|sft|dpo|grpo|distill|merge`.

    qwenkit train sft MODEL --data train.jsonl --out runs/sft [--lora] [--config sft.yaml] [key=value ...]
    torchrun --nproc-per-node 2 -m qwenkit train sft MODEL --data ... --out ...   (DDP; --fsdp: FSDP2)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

FLAG_SETTINGS = ("data", "out", "eval_data", "config", "resume", "max_steps", "lora", "fsdp", "precision")


def cmd_train(args: argparse.Namespace) -> int:
    from qwenkit.train.config import build_config, parse_overrides, read_config_file
    from qwenkit.train.recipes import run

    file_settings = read_config_file(args.config) if args.config else {}
    flags: dict[str, Any] = {"model": args.model} if args.model else {}
    for key in ("data", "out", "eval_data", "resume", "max_steps", "precision"):
        value = getattr(args, key)
        if value is not None:
            flags[key] = value
    if args.lora:
        flags["lora"] = True
    for key in ("lora_r", "lora_alpha", "num_generations"):
        if getattr(args, key, None) is not None:
            flags[key] = getattr(args, key)
    if args.lora_targets:
        flags["lora_targets"] = args.lora_targets
    if args.fsdp:
        flags["fsdp"] = True
    if getattr(args, "precompute_ref", False):
        flags["precompute_ref"] = True
    cfg = build_config(args.recipe, file_settings, flags, parse_overrides(args.overrides))
    try:
        summary = run(cfg)
    except KeyboardInterrupt:  # the trainer has written a checkpoint of the last finished step
        logging.getLogger(__name__).warning("interrupted; continue with --resume")
        return 130
    if not args.quiet_summary and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2, default=str))
    return 0


def add_train_parser(sub: Any) -> None:
    from qwenkit.train.merge import add_merge_parser

    p = sub.add_parser("train", help="pretraining, SFT and LoRA (torchrun for DDP / FSDP2)")
    tsub = p.add_subparsers(dest="recipe", required=True)
    for recipe, helptext in (("pretrain", "continued pretraining on raw text / code or token shards"),
                             ("sft", "supervised fine-tuning on messages, prompt/completion or text"),
                             ("dpo", "direct preference optimisation on prompt/chosen/rejected pairs"),
                             ("grpo", "GRPO: online RL with rollouts from qwenkit's engine on the trained module"),
                             ("distill", "knowledge distillation from a teacher (KD / GKD, int4 recovery)")):
        r = tsub.add_parser(recipe, help=helptext,
                            description=f"{helptext}. Extra `key=value` arguments override any setting "
                                        "(see qwenkit.train.config.TrainConfig).")
        r.add_argument("model", nargs="?", default=None, help="registry name, .gguf, HF folder or hub id")
        r.add_argument("--data", help="JSONL / Parquet / datasets folder / token shards")
        r.add_argument("--out", help="output folder (checkpoints, metrics)")
        r.add_argument("--eval-data", dest="eval_data", default=None, help="held-out data for eval loss")
        r.add_argument("--config", default=None, help="settings file (JSON / YAML / TOML)")
        r.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from the latest checkpoint in --out, or from the given one")
        r.add_argument("--max-steps", dest="max_steps", type=int, default=None)
        r.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
        r.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
        r.add_argument("--lora-r", dest="lora_r", type=int, default=None)
        r.add_argument("--lora-alpha", dest="lora_alpha", type=int, default=None)
        r.add_argument("--lora-targets", dest="lora_targets", default=None, help="comma-separated projections")
        r.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
        if recipe == "grpo":
            r.add_argument("--num-generations", dest="num_generations", type=int, default=None,
                           help="completions per prompt (default 8)")
        if recipe == "dpo":
            r.add_argument("--precompute-ref", dest="precompute_ref", action="store_true",
                           help="score the reference log-probs once before training (no reference model kept)")
        r.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
        r.add_argument("overrides", nargs="*", default=[], help="key=value settings")
        r.set_defaults(func=cmd_train, accepts_overrides=True)
    add_merge_parser(tsub)
