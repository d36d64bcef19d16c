"""`qwenkit train dpo`: direct preference optimisation (TRL 1.16's DPOTrainer math).

Per pair, the policy's and the reference's log-probs summed over the completion tokens give
log-ratios ``chosen_logratios = logp_c - ref_logp_c`` (and rejected); with
``delta = chosen_logratios - rejected_logratios``:

* ``sigmoid``: ``-logsigmoid(beta * delta)`` (the DPO paper);
* ``ipo``: ``(delta_per_token - 1 / (2 beta))^2``, each log-ratio divided by its completion's
  token count first (TRL's length normalisation);
* ``robust``: ``((1 - ls) * -logsigmoid(beta delta) + ls * logsigmoid(-beta delta)) / (1 - 2 ls)``
  with ``ls = label_smoothing``.

The reference is a frozen model (``ref_model``, default the starting model), the LoRA model with
its adapters disabled (``lora=true``), or log-probs precomputed once before training
(``precompute_ref=true``: the starting policy, or ``ref_model``; cached in the output folder).
Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected), averaged over pairs; held-out ones are prefixed ``eval_``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import cpu
from qwenkit.data.readers import read_records
from qwenkit.errors import DataError
from qwenkit.loaders.load import load
from qwenkit.train.attention import DocumentAttention
from qwenkit.train.batch import IGNORE_INDEX
from qwenkit.train.config import TrainConfig
from qwenkit.train.dataloader import IndexRange, split_held_out
from qwenkit.train.loss import token_logps
from qwenkit.train.distributed import DistInfo, all_reduce_sum
from qwenkit.train.precision import autocast_context
from qwenkit.train.preference import (PairLoader, PreferenceBatch, PreferenceExample, collate_pairs,
                                      tokenize_preferences)  # fmt: skip
from qwenkit.train.recipes import check_memory, checkpoint_io, load_training_model, start_run
from qwenkit.train.trainer import Trainer

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "robust")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")  # fmt: skip
REF_CACHE = "ref_logps.pt"


# ---------------------------------------------------------------------------- log-probs
def sequence_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *, chunk: int = 512,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Per row, the log-probs of its target tokens summed (fp32 (rows,)). Rows are right-padded,
    so plain causal attention gives the real positions exactly what they would see alone."""
    attn = DocumentAttention(torch.zeros_like(input_ids))
    hidden = model.hidden_states(input_ids, None, attn)  # (R, T, H)
    keep = targets != IGNORE_INDEX
    per_token = token_logps(hidden[keep], model.lm_head.weight, targets[keep], chunk=chunk,
                            compute_dtype=compute_dtype)  # fmt: skip
    rows = keep.nonzero()[:, 0]
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    # keeps the graph when no row has a target (DDP needs every rank to backward)
    return out.index_add(0, rows, per_token) + hidden.sum() * 0.0


# ---------------------------------------------------------------------------- loss
def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-pair losses (B,) and per-pair metrics (TRL's names) for one of LOSS_TYPES.

    ``chosen_lengths`` / ``rejected_lengths``: completion token counts (IPO's normalisation)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the completion lengths")
        ipo_delta = (chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / rejected_lengths.clamp(min=1.0))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        ls = label_smoothing
        losses = (-(1 - ls) * F.logsigmoid(beta * delta) + ls * F.logsigmoid(-beta * delta)) / (1 - 2 * ls)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    stats = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return losses, stats


class DPOObjective(nn.Module):
    """The trainer's objective: forward(PreferenceBatch) -> (loss summed over pairs, metric sums).

    Reference log-probs come from the batch (precomputed), else ``ref_model`` (frozen, kept out of
    this module's parameters so DDP / FSDP / the optimizer never see it), else the policy with
    ``peft_model``'s adapters disabled."""

    def __init__(self, model: nn.Module, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 chunk: int = 512, compute_dtype: torch.dtype | None = None, ref_model: nn.Module | None = None,
                 peft_model: Any = None) -> None:  # fmt: skip
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {LOSS_TYPES}")
        self.model = model
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.chunk, self.compute_dtype = chunk, compute_dtype
        self._ref = [ref_model]  # a list: not registered as a submodule
        self._peft = [peft_model]

    def _apply(self, fn: Any, recurse: bool = True) -> DPOObjective:  # .to(device) moves the reference too
        super()._apply(fn, recurse)
        if self._ref[0] is not None:
            self._ref[0]._apply(fn, recurse)
        return self

    def logps(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        return sequence_logps(model, batch.input_ids, batch.targets, chunk=self.chunk, compute_dtype=self.compute_dtype)

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
            return batch.ref_chosen_logps, batch.ref_rejected_logps
        ref, peft_model = self._ref[0], self._peft[0]
        if ref is not None:
            out = self.logps(ref, batch)
        elif peft_model is not None:
            with peft_model.disable_adapter():
                out = self.logps(self.model, batch)
        else:
            raise RuntimeError("DPO needs a reference: a reference model, a LoRA policy or precomputed log-probs")
        c, r = out.chunk(2)
        return c, r

    def forward(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref_c, ref_r = self.reference_logps(batch)
        chosen, rejected = self.logps(self.model, batch).chunk(2)
        lc, lr = batch.completion_lengths.float().chunk(2)
        losses, stats = dpo_loss(chosen, rejected, ref_c.float(), ref_r.float(), beta=self.beta,
                                 loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                 chosen_lengths=lc, rejected_lengths=lr)  # fmt: skip
        valid = batch.valid.to(losses.dtype)
        return (losses * valid).sum(), {k: (v * valid).sum() for k, v in stats.items()}


# ---------------------------------------------------------------------------- reference
def _fingerprint(pairs: list[PreferenceExample], ref: str) -> str:
    h = hashlib.sha256(ref.encode())
    for p in pairs:
        h.update(json.dumps([p.chosen_ids, p.chosen_prompt_len, p.rejected_ids, p.rejected_prompt_len]).encode())
    return h.hexdigest()


@torch.no_grad()
def precompute_reference(objective: DPOObjective, pairs: list[PreferenceExample], info: DistInfo, *,
                         batch_pairs: int = 4, precision: str = "fp32", cache: Path | None = None,
                         ref_name: str = "") -> None:  # fmt: skip
    """Fill each pair's ref_chosen_logps / ref_rejected_logps with the objective's reference
    (each rank scores its share; the sums are all-reduced). ``cache``: a file reused when it
    holds the same pairs and reference (e.g. on resume), written by rank 0 otherwise."""
    key = _fingerprint(pairs, ref_name)
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == key:
            for p, c, r in zip(pairs, saved["chosen"].tolist(), saved["rejected"].tolist()):
                p.ref_chosen_logps, p.ref_rejected_logps = c, r
            logger.info("reference log-probs of %d pairs read from %s", len(pairs), cache)
            return
    n = len(pairs)
    values = [0.0] * (2 * n)
    mine = list(range(n))[info.rank :: info.world_size]
    was_training = objective.training
    objective.eval()
    for s in range(0, len(mine), batch_pairs):
        idx = mine[s : s + batch_pairs]
        batch = collate_pairs([dataclasses.replace(pairs[i], ref_chosen_logps=None) for i in idx]).to(info.device)
        with autocast_context(precision, info.device):
            c, r = objective.reference_logps(batch)
        for i, cv, rv in zip(idx, c.tolist(), r.tolist()):
            values[i], values[n + i] = cv, rv
    objective.train(was_training)
    values = all_reduce_sum(values, info)
    for i, p in enumerate(pairs):
        p.ref_chosen_logps, p.ref_rejected_logps = values[i], values[n + i]
    logger.info("precomputed the reference log-probs of %d pairs", n)
    if cache is not None and info.is_main:
        torch.save({"fingerprint": key, "chosen": torch.tensor(values[:n], dtype=torch.float64),
                    "rejected": torch.tensor(values[n:], dtype=torch.float64)}, cache)  # fmt: skip


def load_reference_model(name: str, info: DistInfo) -> nn.Module:
    lm = load(name, dtype=torch.float32, device=info.device, progress=False)
    ref = cpu.uninstall(lm.model).eval()
    ref.requires_grad_(False)
    return ref


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pairs(objective: nn.Module, batches: list[PreferenceBatch], info: DistInfo,
                   precision: str = "fp32") -> dict[str, float]:  # fmt: skip
    """Held-out loss and metrics per pair (``eval_loss``, ``eval_rewards/accuracies``, ...)."""
    was_training = objective.training
    objective.eval()
    loss, count, sums = 0.0, 0, dict.fromkeys(METRICS, 0.0)
    for b in batches[info.rank :: info.world_size]:
        b = b.to(info.device)
        with autocast_context(precision, info.device):
            l_sum, stats = objective(b)
        loss += float(l_sum)
        count += b.num_units
        for k in METRICS:
            sums[k] += float(stats[k])
    objective.train(was_training)
    total = all_reduce_sum([loss, count] + [sums[k] for k in METRICS], info)
    n = max(total[1], 1.0)
    out = {"eval_loss": total[0] / n}
    out.update({f"eval_{k}": v / n for k, v in zip(METRICS, total[2:])})
    return out


# ---------------------------------------------------------------------------- the run
def load_pairs(path: str, cfg: TrainConfig, tokenizer: Any) -> tuple[list[PreferenceExample], dict[str, Any]]:
    if not Path(path).exists():
        raise DataError(f"{path}: no such file or folder")
    pairs, stats = tokenize_preferences(read_records(path, check=False), tokenizer, max_length=cfg.max_length,
                                        truncation_mode=cfg.truncation_mode,
                                        max_prompt_length=cfg.max_prompt_length)  # fmt: skip
    return pairs, dataclasses.asdict(stats)


def run_recipe(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    out = start_run(cfg, info)
    lm, model, peft_model = load_training_model(cfg, info)
    pairs, data_stats = load_pairs(cfg.data, cfg, lm.tokenizer)
    if cfg.eval_data:
        train_pairs, held = pairs, load_pairs(cfg.eval_data, cfg, lm.tokenizer)[0]
    elif cfg.eval_examples:
        tr, he = split_held_out(pairs, n=cfg.eval_examples)
        train_pairs, held = _as_list(tr), _as_list(he)
    else:
        train_pairs, held = pairs, []

    # the reference: a frozen model unless LoRA (adapters off) or precomputed from the start policy
    ref_model = None
    if cfg.ref_model or not (cfg.lora or cfg.precompute_ref):
        ref_model = load_reference_model(cfg.ref_model or cfg.model, info)
    compute = torch.bfloat16 if cfg.precision == "bf16" else None

    def make_objective(m: nn.Module, dtype: torch.dtype | None, ref: Any = "current") -> DPOObjective:
        ref = ref_model if ref == "current" else ref
        return DPOObjective(m, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                            chunk=cfg.loss_chunk, compute_dtype=dtype, ref_model=ref,
                            peft_model=peft_model if ref is None else None)  # fmt: skip

    if cfg.precompute_ref:
        # before the Trainer loads a checkpoint: the policy is still the starting model
        source = ref_model if ref_model is not None else (None if peft_model is not None else model)
        pre = make_objective(model, compute, ref=source).to(info.device)
        precompute_reference(pre, train_pairs + held, info, batch_pairs=max(cfg.micro_batch_size, 1),
                             precision=cfg.precision, cache=out / REF_CACHE, ref_name=cfg.ref_model or cfg.model)
        del pre
        ref_model = None  # the batches carry the log-probs

    loader = PairLoader(train_pairs, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                        rank=info.rank, world_size=info.world_size, seed=cfg.seed)  # fmt: skip
    # the estimate's "rows": two per pair, each up to max_length
    mem = check_memory(model, dataclasses.replace(cfg, packing=True, micro_batch_size=2 * cfg.micro_batch_size), info)
    logger.info("data: %s; %d steps an epoch; memory estimate %.1f GiB%s", data_stats, loader.steps_per_epoch,
                mem["estimate_gb"], " + the reference model" if ref_model is not None else "")
    eval_batches = [collate_pairs(held[s : s + cfg.micro_batch_size]) for s in range(0, len(held), cfg.micro_batch_size)]

    def after_step(trainer: Trainer) -> dict[str, float] | None:
        step = trainer.state.step + 1  # the step just taken (counted after this hook)
        if eval_batches and cfg.eval_every and step % cfg.eval_every == 0:
            return evaluate_pairs(trainer.loss_module, eval_batches, info, cfg.precision)
        return None

    save_model, load_trainable = checkpoint_io(cfg, lm, peft_model)
    k = 4.0 if cfg.lora else 6.0
    body = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and m.weight is not model.lm_head.weight)  # fmt: skip
    # MFU's work per token: the decoder's training matmuls plus a reference forward (LM head left out)
    flops = (k * body + (0.0 if cfg.precompute_ref else 2.0 * body), 0.0)
    trainer = Trainer(cfg, model, loader, info, save_model=save_model, load_trainable=load_trainable, flops=flops,
                      objective=make_objective, after_step=after_step)  # fmt: skip
    metrics_file = out / "metrics.jsonl"
    summary: dict[str, Any] = {}
    if eval_batches and trainer.state.step == 0:
        start = evaluate_pairs(trainer.loss_module, eval_batches, info, cfg.precision)
        summary.update({f"{k}_start": v for k, v in start.items()})
        _append(metrics_file, {"step": 0, **start}, info)
    summary.update(trainer.fit())
    if eval_batches:
        end = evaluate_pairs(trainer.loss_module, eval_batches, info, cfg.precision)
        summary.update({f"{k}_end": v for k, v in end.items()})
        _append(metrics_file, {"step": trainer.state.step, **end}, info)
    summary["data"] = data_stats
    summary["memory_estimate_gb"] = mem["estimate_gb"]
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _as_list(r: IndexRange) -> list[PreferenceExample]:
    return [r[i] for i in range(len(r))]


def _append(path: Path, record: dict[str, Any], info: DistInfo) -> None:
    if info.is_main:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


__all__ = ["DPOObjective", "LOSS_TYPES", "dpo_loss", "evaluate_pairs", "precompute_reference", "run_recipe",
           "sequence_logps"]
