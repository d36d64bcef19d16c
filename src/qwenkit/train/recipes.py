"""A training run from its configuration: model, adapters, data, loop, outputs.

`run(cfg)` is what `qwenkit train pretrain|sft` calls, in one process or in each torchrun rank.
The output folder ends up with `checkpoint-*/` (the last one is the result: an HF folder, or a
peft adapter for LoRA), `metrics.jsonl`, `tensorboard/` and `train_config.json`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qwenkit import cpu
from qwenkit.cpu.allocator import available_bytes, keep_freed_memory
from qwenkit.data.readers import read_records
from qwenkit.data.shards import TokenShards
from qwenkit.errors import DataError, QwenkitError
from qwenkit.loaders.hf import export_hf, iter_hf_weights
from qwenkit.loaders.load import load
from qwenkit.train.batch import Batch
from qwenkit.train.config import TrainConfig
from qwenkit.train.dataloader import StepLoader, split_held_out
from qwenkit.train.distributed import DistInfo, init_distributed, shutdown
from qwenkit.train.precision import cast_frozen_linears, resolve_precision
from qwenkit.train.sft_data import tokenize_records
from qwenkit.train.trainer import Trainer

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA: exact adapter tensors for resuming


class TrainMemoryError(QwenkitError):
    pass


def is_token_shards(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".json" and path.with_suffix(".idx").exists() or path.name == "dataset.json"
    return path.is_dir() and ((path / "dataset.json").is_file() or any(path.glob("*.idx")))


def load_documents(path: str, cfg: TrainConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """A document source for StepLoader: token shards as they are, or records tokenized."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if is_token_shards(p):
        shards = TokenShards.open(p)
        if shards.vocab_size and shards.vocab_size > tokenizer.vocab_size:
            raise DataError(f"{p}: shards were tokenized with a vocabulary of {shards.vocab_size}, "
                            f"the model's tokenizer has {tokenizer.vocab_size}")
        return shards, {"format": "token_shards", "documents": len(shards), "tokens": int(shards.num_tokens)}
    # pretraining documents end with <|endoftext|> (how Qwen2.5 separates documents); SFT "text"
    # rows follow TRL (the tokenizer's EOS)
    eos = "<|endoftext|>" if cfg.recipe == "pretrain" else None
    examples, stats = tokenize_records(read_records(p), tokenizer, max_length=cfg.max_length,
                                       overflow=cfg.overflow, eos_token=eos)
    return examples, {"format": "records", **stats.__dict__}


def training_documents(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(training documents, held-out documents or None, data stats): `eval_data`, else the last
    `eval_examples` documents held out, else nothing held out."""
    docs, data_stats = load_documents(cfg.data, cfg, tokenizer)
    if cfg.eval_data:
        held, _ = load_documents(cfg.eval_data, cfg, tokenizer)
        return docs, held, data_stats
    if cfg.eval_examples:
        train_docs, held = split_held_out(docs, n=cfg.eval_examples)
        return train_docs, held, data_stats
    return docs, None, data_stats


def step_loader(cls: type[StepLoader], docs: Any, cfg: TrainConfig, info: DistInfo) -> StepLoader:
    """This rank's loader (`cls`: StepLoader or a subclass) with the run's batching settings."""
    return cls(docs, max_length=cfg.max_length, packing=cfg.packing, batch_size=cfg.batch_size,
               token_budget=cfg.token_budget, buckets=None if cfg.packing else cfg.bucket_lengths,
               micro_batch_size=cfg.micro_batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.seed)


def eval_batches(source: Any, cfg: TrainConfig) -> list[Batch]:
    loader = StepLoader(source, max_length=cfg.max_length, packing=cfg.packing,
                        batch_size=cfg.batch_size, token_budget=cfg.token_budget,
                        buckets=cfg.bucket_lengths if not cfg.packing else None,
                        micro_batch_size=cfg.micro_batch_size, shuffle=False, pad_to_longest=True)
    out: list[Batch] = []
    for step, micro in zip(range(loader.steps_per_epoch), loader):
        out.extend(b for b in micro if b.num_target_tokens)
    return out


def linear_flops(model: nn.Module, lora: bool) -> tuple[float, float]:
    """Training FLOPs of the matmuls: (per token through the decoder, per target token through
    the LM head, which only scores positions with a target). 6 N for full training, ~4 N with
    frozen weights (no weight gradients); attention's T^2 term is left out."""
    head = model.lm_head.weight
    k = 4.0 if lora else 6.0
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not head)
    return k * body, k * head.numel()


def check_memory(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> dict[str, float]:
    """Estimate the peak (weights + gradients + AdamW + activations) against available RAM."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.config
    shard = info.world_size if cfg.fsdp else 1
    weights = 4 * params / shard
    grads_opt = (4 + 8) * trainable / shard
    tokens = cfg.micro_batch_size * (cfg.max_length if cfg.packing else max(cfg.bucket_lengths))
    # per token and layer: ~12 hidden-sized and ~5 intermediate-sized saved tensors (q/k/v, norms,
    # residuals, the MLP), counted at 4 bytes: under bf16 autocast the residual stream and the
    # norms stay fp32 (measured: a 0.5B LoRA run of 4 x 1024 tokens peaked at 7.0 GB)
    per_layer = (12 * c.hidden_size + 5 * c.intermediate_size) * 4
    layers = 2 if cfg.gradient_checkpointing else c.num_hidden_layers
    activations = tokens * per_layer * layers + tokens * c.hidden_size * 4 * c.num_hidden_layers * cfg.gradient_checkpointing
    lm_head = 2 * cfg.loss_chunk * c.vocab_size * 4
    need = weights + grads_opt + activations + lm_head
    est = {"params": params, "trainable": trainable, "estimate_gb": need / 1024**3}
    avail = _available_bytes()
    if avail:
        est["available_gb"] = avail / 1024**3
        per_node = need * min(info.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
        if info.device.type == "cpu" and per_node > avail and cfg.memory_check:
            raise TrainMemoryError(
                f"this run needs about {per_node / 1024**3:.1f} GiB (weights {weights / 1024**3:.1f}, "
                f"gradients+AdamW {grads_opt / 1024**3:.1f}, activations {activations / 1024**3:.1f} per rank) "
                f"but {avail / 1024**3:.1f} GiB is available: use lora=true, gradient_checkpointing=true, "
                f"a smaller micro_batch_size / max_length, fsdp=true across machines, or memory_check=false")
    return est


def _available_bytes() -> int:
    return available_bytes()


def load_training_model(cfg: TrainConfig, info: DistInfo) -> tuple[Any, nn.Module, Any]:
    """(loaded model record, the plain module to train, the peft model or None).

    fp32 weights (the master copy); the CPU runtime's inference modules are taken out; with
    LoRA under bf16 autocast the frozen linears are stored in bf16."""
    if info.device.type == "cpu":
        keep_freed_memory()  # no page faults on every step's big buffers (cpu/allocator.py)
    lm = load(cfg.model, dtype=torch.float32, device=info.device, progress=cfg.progress and info.is_main)
    model = cpu.uninstall(lm.model)
    peft_model = None
    if cfg.lora:
        from qwenkit.train.lora import prepare_lora

        peft_model = prepare_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=cfg.lora_targets)
        model = peft_model.get_base_model()
        if resolve_precision(cfg.precision, info.device) == "bf16":
            cast_frozen_linears(model, torch.bfloat16)
    return lm, model.train(), peft_model


def checkpoint_io(cfg: TrainConfig, lm: Any, peft_model: Any) -> tuple[
    Callable[[nn.Module, Path], None], Callable[[nn.Module, Path], None]
]:
    """(save_model, load_trainable) for the Trainer: an HF folder of the full model, or the peft
    adapter plus the exact trainable tensors (for resuming) with LoRA."""
    tokenizer = lm.tokenizer

    def save_model(m: nn.Module, folder: Path) -> None:
        if peft_model is not None:
            from safetensors.torch import save_file

            from qwenkit.train.lora import save_adapter

            save_adapter(peft_model, folder, base_model_name_or_path=str(cfg.model))
            trainable = {n: p.detach().cpu().contiguous() for n, p in m.named_parameters() if p.requires_grad}
            save_file(trainable, str(folder / TRAINABLE_FILE))
        else:
            export_hf(m, folder, tokenizer=tokenizer, generation=lm.generation_defaults, dtype=torch.float32)

    def load_trainable(m: nn.Module, folder: Path) -> None:
        if peft_model is not None:
            from safetensors.torch import load_file

            state = load_file(str(folder / TRAINABLE_FILE))
            missing = {n for n, p in m.named_parameters() if p.requires_grad} - set(state)
            if missing:
                raise QwenkitError(f"{folder / TRAINABLE_FILE}: missing {sorted(missing)[:4]}")
            m.load_state_dict(state, strict=False)
        else:
            loaded = m.load_weights(iter_hf_weights(folder, dtype=torch.float32, progress=False))
            missing = {n for n, _ in m.named_parameters(remove_duplicate=False)} - loaded
            if missing:
                raise QwenkitError(f"{folder}: checkpoint lacks {sorted(missing)[:4]}")

    return save_model, load_trainable


# recipes beyond the LM loss live in their own modules, each with `run_recipe(cfg, info)`
RECIPE_MODULES = {"dpo": "qwenkit.train.dpo", "grpo": "qwenkit.train.grpo", "distill": "qwenkit.train.distill"}


def run(cfg: TrainConfig) -> dict[str, Any]:
    info = init_distributed(cfg.device)
    try:
        if cfg.recipe in RECIPE_MODULES:
            import importlib

            return importlib.import_module(RECIPE_MODULES[cfg.recipe]).run_recipe(cfg, info)
        return _run(cfg, info)
    finally:
        shutdown()


def start_run(cfg: TrainConfig, info: DistInfo) -> Path:
    """Common start of every recipe: checks, threads, precision, the printed and saved config."""
    if not cfg.data:
        raise DataError("no training data: pass --data (JSONL / Parquet / a datasets folder / token shards)")
    if not cfg.out:
        raise QwenkitError("no output folder: pass --out DIR")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    cfg.precision = resolve_precision(cfg.precision, info.device)
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(cfg.to_dict(), indent=2)
        logger.info("configuration:\n%s", text)
        (out / "train_config.json").write_text(text)
    torch.manual_seed(cfg.seed)
    return out


def _run(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    out = start_run(cfg, info)

    lm, model, peft_model = load_training_model(cfg, info)
    tokenizer = lm.tokenizer

    train_docs, held, data_stats = training_documents(cfg, tokenizer)
    loader = step_loader(StepLoader, train_docs, cfg, info)
    mem = check_memory(model, cfg, info)
    logger.info("data: %s; %d steps an epoch; memory estimate %.1f GiB", data_stats, loader.steps_per_epoch,
                mem["estimate_gb"])

    save_model, load_trainable = checkpoint_io(cfg, lm, peft_model)
    trainer = Trainer(cfg, model, loader, info, eval_batches=eval_batches(held, cfg) if held is not None else None,
                      save_model=save_model, load_trainable=load_trainable,
                      flops=linear_flops(model, cfg.lora))
    summary = trainer.fit()
    summary["data"] = data_stats
    summary["memory_estimate_gb"] = mem["estimate_gb"]
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
