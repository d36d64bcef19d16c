"""GRPO (TRL 1.16's GRPOTrainer formulas) on the shared trainer loop.

Per optimizer step: the next prompts are rolled out G times by qwenkit's engine on the module
being trained (`rollout.py`), scored (`rewards.py`), turned into advantages (group mean-centred,
std-scaled by group / batch / none) and packed into micro-batches; with `num_iterations` > 1 the
same rollouts serve that many optimizer steps against their old log-probs.

Loss per completion token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) (times the
importance-sampling ratio of quantized rollouts) + beta * k3 KL to the reference. Normalised as
TRL's `loss_type`: grpo = mean over sequences of each sequence's token mean (unit: a sequence),
dr_grpo = token sum / (sequences * max_completion_length) (unit: a sequence), dapo = token sum /
completion tokens of the step (unit: a token). The trainer divides the summed loss by the step's
unit count, so every micro-batch returns the sum over its units.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qwenkit.errors import DataError
from qwenkit.train.attention import DocumentAttention
from qwenkit.train.config import TrainConfig
from qwenkit.train.distributed import DistInfo
from qwenkit.train.loss import token_logps
from qwenkit.train.precision import autocast_context

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ advantages and the loss
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (TRL's `nanstd`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(n > 1, n / (n - 1), torch.full_like(n, math.nan, dtype=var.dtype))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
               scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's `sum_then_normalize`: (advantages, rewards, is_std_zero), rows grouped by prompt.
    A completion every function skipped (all NaN) gets advantage 0 and stays out of its group's
    mean."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None]).nansum(dim=1)
    rewards[unscorable] = math.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1 \
            else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected group, batch or none")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), rewards, is_std_zero


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                   adv: torch.Tensor, *, beta: float, epsilon_low: float, epsilon_high: float,
                   is_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (+ beta * k3 KL) per token (B, T); and per-token indicators for the
    metrics (low / high / region clipped, KL)."""
    old = logps.detach() if old_logps is None else old_logps
    a = adv[:, None]
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(coef_1 * a, coef_2 * a)
    if is_ratio is not None:
        loss = loss * is_ratio
    extra: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        assert ref_logps is not None
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
        extra["kl"] = kl.detach()
    low = (coef_1 < 1 - epsilon_low) & (a < 0)
    high = (coef_1 > 1 + epsilon_high) & (a > 0)
    extra.update({"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
                  "clip_ratio/region_mean": (low | high).float()})
    return loss, extra


def reduce_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The loss summed over this batch's units (sequences for grpo / dr_grpo, tokens for dapo)."""
    masked = loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length
    if loss_type == "dapo":
        return masked.sum()
    raise ValueError(f"loss_type={loss_type!r}: expected grpo, dr_grpo or dapo")


# ------------------------------------------------------------------ micro-batches and the objective
@dataclass
class GRPOBatch:
    """Rows of prompt + completion, right-padded. Completion tensors are (B, C): the C target
    tokens that start at `prompt_lens`."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    document_ids: torch.Tensor  # (B, T): 0, -1 for padding
    completion_ids: torch.Tensor  # (B, C), 0 padded
    completion_mask: torch.Tensor  # (B, C) float
    prompt_lens: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    is_ratio: torch.Tensor | None
    loss_type: str
    token_weight: float  # units of the step / completion tokens of the step (token-mean metrics)

    @property
    def num_units(self) -> int:
        if self.loss_type == "dapo":
            return int(self.completion_mask.sum())
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((self.document_ids >= 0).sum())

    def to(self, device: torch.device | str) -> GRPOBatch:
        def mv(t: Any) -> Any:
            return t.to(device) if isinstance(t, torch.Tensor) else t
        return GRPOBatch(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))


def completion_positions(b: GRPOBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions whose next token is completion token j of each row."""
    B, C = b.completion_ids.shape
    rows = torch.arange(B, device=b.input_ids.device)[:, None].expand(B, C)
    cols = (b.prompt_lens[:, None] - 1 + torch.arange(C, device=b.input_ids.device)[None]).clamp(
        max=b.input_ids.shape[1] - 1)
    return rows, cols


def sequence_logps(model: nn.Module, b: GRPOBatch, *, chunk: int, temperature: float,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per completion token log-probs (B, C) under `model` (0 at padding)."""
    hidden = model.hidden_states(b.input_ids, b.position_ids, DocumentAttention(b.document_ids))
    rows, cols = completion_positions(b)
    keep = b.completion_mask.bool()
    h = hidden[rows[keep], cols[keep]]
    lp = token_logps(h, model.lm_head.weight, b.completion_ids[keep], chunk=chunk, temperature=temperature,
                     compute_dtype=compute_dtype)
    out = torch.zeros(b.completion_ids.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(keep, lp)


class GRPOObjective(nn.Module):
    def __init__(self, model: nn.Module, cfg: TrainConfig, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.compute_dtype = compute_dtype

    def forward(self, b: GRPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        logps = sequence_logps(self.model, b, chunk=cfg.loss_chunk, temperature=cfg.temperature,
                               compute_dtype=self.compute_dtype)
        loss, extra = per_token_loss(logps, b.old_logps, b.ref_logps, b.advantages, beta=cfg.beta,
                                     epsilon_low=cfg.epsilon, epsilon_high=epsilon_high(cfg), is_ratio=b.is_ratio)
        mask = b.completion_mask
        total = reduce_loss(loss, mask, cfg.loss_type, cfg.max_completion_length)
        # token means over the whole step: sum * (step units / step tokens), divided by the units
        stats = {k: (v * mask).sum() * b.token_weight for k, v in extra.items()}
        return total, stats


def epsilon_high(cfg: TrainConfig) -> float:
    return cfg.epsilon_high if cfg.epsilon_high > 0 else cfg.epsilon


# ------------------------------------------------------------------ prompts and the step source
@dataclass
class PromptRow:
    prompt: Any  # text or messages (what reward functions get)
    ids: list[int]
    columns: dict[str, Any]


def load_prompts(path: str, tokenizer: Any, max_prompt_length: int) -> list[PromptRow]:
    from qwenkit.data.readers import read_records

    rows = []
    for rec in read_records(path, check=False):  # GRPO rows: a prompt and any columns
        prompt = rec.data.get("prompt")
        if prompt is None:
            raise rec.error("GRPO rows need a 'prompt' (text or a list of messages)")
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        else:
            raise rec.error(f"'prompt' must be text or a list of messages, got {type(prompt).__name__}")
        if not ids:
            raise rec.error("empty prompt")
        ids = ids[-max_prompt_length:]  # TRL keeps the end of a long prompt (left truncation)
        rows.append(PromptRow(prompt, list(ids), {k: v for k, v in rec.data.items() if k != "prompt"}))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


class GRPOSource:
    """The trainer's step source: each optimizer step's micro-batches, built from fresh rollouts
    (reused `num_iterations` times)."""

    def __init__(self, cfg: TrainConfig, rows: list[PromptRow], rollouts: Any, reward_funcs: list,
                 weights: list[float], ref: Any = None, policy: nn.Module | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.rows = rows
        self.rollouts = rollouts
        self.reward_funcs = reward_funcs
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.ref = ref  # callable(batch) -> ref logps, or None
        self.policy = policy
        self.device = device
        self.prompts_per_step = max(1, cfg.batch_size // cfg.num_generations)
        self.order = list(range(len(rows)))
        self.position = 0
        self.epoch = 0
        self.steps_per_epoch = max(1, len(rows) // self.prompts_per_step) * cfg.num_iterations
        self.metrics: dict[str, float] = {}
        self.yielded_at = 0.0
        self._shuffle()

    def _shuffle(self) -> None:
        if getattr(self, "_fixed_order", None) is not None:
            self.order = list(self._fixed_order)
            return
        self.order = list(range(len(self.rows)))
        random.Random(self.cfg.seed + self.epoch).shuffle(self.order)

    def set_order(self, order: list[int]) -> None:
        """A fixed prompt order (the reward-variance pre-pass), kept every epoch."""
        self._fixed_order = list(order)
        self.order = list(order)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "epoch": self.epoch, "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.epoch, self.order = state["position"], state["epoch"], list(state["order"])

    def _next_rows(self) -> list[PromptRow]:
        if self.position + self.prompts_per_step > len(self.order):
            self.epoch += 1
            self.position = 0
            self._shuffle()
        rows = [self.rows[i] for i in self.order[self.position : self.position + self.prompts_per_step]]
        self.position += self.prompts_per_step
        return rows

    def score(self, rows: list[PromptRow]) -> tuple[Any, torch.Tensor]:
        """Roll out and score `rows`: (rollout batch, rewards per completion and function)."""
        from qwenkit.train.rewards import score

        G = self.cfg.num_generations
        with autocast_context(self.cfg.precision, self.device):
            batch = self.rollouts.generate([r.ids for r in rows])
        t0 = time.perf_counter()
        prompts = [r.prompt for r in rows for _ in range(G)]
        conversational = [not isinstance(r.prompt, str) for r in rows for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if conv else t
                       for t, conv in zip(batch.texts, conversational)]
        keys = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows for _ in range(G)] for k in keys}
        table = torch.tensor(score(self.reward_funcs, prompts, completions, batch.completion_ids, columns),
                             dtype=torch.float32)
        batch.extra["reward_s"] = time.perf_counter() - t0
        return batch, table

    def __iter__(self):
        while True:
            # rollouts, old and reference log-probs in the trainer's precision (under bf16 a LoRA
            # run's frozen base linears are stored in bf16)
            with autocast_context(self.cfg.precision, self.device):
                micro = self.build_step()
            for _ in range(self.cfg.num_iterations):
                self.yielded_at = time.perf_counter()
                yield micro

    def build_step(self) -> list[GRPOBatch]:
        cfg = self.cfg
        G = cfg.num_generations
        rows = self._next_rows()
        batch, table = self.score(rows)
        adv, rewards, zero = advantages(table, self.weights, G, cfg.scale_rewards)
        lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float32)
        truncated = torch.tensor([r == "length" for r in batch.finish_reasons], dtype=torch.float32)
        m: dict[str, float] = {
            "reward": float(torch.nanmean(rewards)), "reward_std": float(nanstd(rewards)),
            "frac_reward_zero_std": float(zero.float().mean()),
            "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean()),
            "rollout_tokens_per_s": batch.tokens_per_s, "time/rollout_s": batch.seconds,
            "time/reward_s": batch.extra["reward_s"],
        }
        for j, (name, _) in enumerate(self.reward_funcs):
            m[f"rewards/{name}/mean"] = float(torch.nanmean(table[:, j]))
            m[f"rewards/{name}/std"] = float(nanstd(table[:, j]))
        keep = list(range(len(batch.completion_ids)))
        if cfg.beta == 0.0:  # a group with equal rewards has zero advantages: no gradient at all
            keep = [i for i in keep if not bool(zero[i])]
        m["skipped_groups"] = float((len(batch.completion_ids) - len(keep)) // G)
        micro = self._micro_batches(batch, adv, keep, m)
        self.metrics = m
        return micro

    def _micro_batches(self, batch: Any, adv: torch.Tensor, keep: list[int], m: dict[str, float]) -> list[GRPOBatch]:
        cfg = self.cfg
        keep = [i for i in keep if batch.completion_ids[i]]  # an empty completion has nothing to score
        tokens = sum(len(batch.completion_ids[i]) for i in keep)
        units = tokens if cfg.loss_type == "dapo" else len(keep)
        weight = units / max(tokens, 1)
        out = []
        for s in range(0, len(keep), cfg.micro_batch_size):
            idx = keep[s : s + cfg.micro_batch_size]
            b = collate([batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx],
                        adv[idx], cfg.loss_type, weight)
            need_old = cfg.num_iterations > 1 or cfg.rollout_quantization != "none"
            with torch.no_grad():
                if need_old:
                    was = self.policy.training
                    self.policy.eval()
                    b.old_logps = sequence_logps(self.policy, b, chunk=cfg.loss_chunk, temperature=cfg.temperature)
                    self.policy.train(was)
                if cfg.beta != 0.0:
                    b.ref_logps = self.ref(b)
            if cfg.rollout_quantization != "none" and cfg.vllm_importance_sampling_correction:
                samp = _pad([batch.sampling_logps[i] for i in idx], b.completion_ids.shape[1], math.nan)
                b.is_ratio = importance_sampling_ratio(b.old_logps, samp, b.completion_mask, cfg)
                delta = (b.old_logps - samp).abs()[b.completion_mask.bool()]
                delta = delta[~torch.isnan(delta)]
                if delta.numel():
                    m["sampling/sampling_logp_difference/mean"] = float(delta.mean())
                    m["sampling/sampling_logp_difference/max"] = max(
                        m.get("sampling/sampling_logp_difference/max", 0.0), float(delta.max()))
                m["sampling/importance_sampling_ratio/mean"] = float(b.is_ratio[b.completion_mask.bool()].mean()) \
                    if b.is_ratio.dim() == 2 else float(b.is_ratio.mean())
            out.append(b)
        return out


def importance_sampling_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor,
                              cfg: TrainConfig) -> torch.Tensor:
    """TRL's `vllm_importance_sampling_correction`: exp(trainer - sampler log-probs) per token or
    per sequence, truncated at (or, *_mask modes, zeroed outside) [clip_min, clip_max]."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    mode = cfg.vllm_importance_sampling_mode
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    lo = cfg.vllm_importance_sampling_clip_min
    hi = cfg.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        return ratio.clamp(min=lo if lo > 0 else None, max=hi if hi > 0 else None)
    bad = (ratio < (lo if lo > 0 else -math.inf)) | (ratio > (hi if hi > 0 else math.inf))
    return ratio.masked_fill(bad, 0.0)


def _pad(rows: list[list[float]], width: int, fill: float) -> torch.Tensor:
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.float32)


def collate(prompts: list[list[int]], completions: list[list[int]], adv: torch.Tensor, loss_type: str,
            token_weight: float) -> GRPOBatch:
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(len(c) for c in completions)
    B = len(prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    comp = torch.zeros(B, C, dtype=torch.long)
    mask = torch.zeros(B, C, dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        doc[i, :n] = 0
        comp[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1.0
    pos = torch.arange(T).expand(B, T).clone()
    return GRPOBatch(ids, pos, doc, comp, mask, torch.tensor([len(p) for p in prompts]), adv.float().clone(),
                     None, None, None, loss_type, token_weight)


# ------------------------------------------------------------------ the recipe
def reward_variance_order(source: GRPOSource) -> list[int]:
    """Pre-pass: roll out every prompt once and order prompts by the variance of their rewards,
    highest first (a prompt whose completions all score the same teaches nothing)."""
    G = source.cfg.num_generations
    variances = []
    for s in range(0, len(source.rows), source.prompts_per_step):
        rows = source.rows[s : s + source.prompts_per_step]
        _, table = source.score(rows)
        rewards = (table * source.weights[None]).nansum(dim=1).view(-1, G)
        v = torch.nan_to_num(nanstd(rewards, dim=1) ** 2, nan=0.0)
        variances.extend(v.tolist())
    source.rollouts.refresh()
    order = sorted(range(len(source.rows)), key=lambda i: (-variances[i], i))
    logger.info("reward-variance pre-pass: %d of %d prompts have rewards that vary", sum(v > 0 for v in variances),
                len(variances))
    return order


def run_recipe(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    from qwenkit.train.recipes import checkpoint_io, check_memory, linear_flops, load_training_model, start_run
    from qwenkit.train.rewards import load_reward_func
    from qwenkit.train.rollout import Rollouts
    from qwenkit.train.trainer import Trainer

    out = start_run(cfg, info)
    lm, model, peft_model = load_training_model(cfg, info)
    tokenizer = lm.tokenizer
    rows = load_prompts(cfg.data, tokenizer, cfg.max_prompt_length)
    funcs = [load_reward_func(spec, cfg.reward_timeout) for spec in cfg.reward_funcs]
    weights = list(cfg.reward_weights) or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise DataError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions")

    ref = None
    if cfg.beta != 0.0:
        if peft_model is not None:  # the reference is the base model: the adapter switched off
            def ref(b: GRPOBatch) -> torch.Tensor:
                with peft_model.disable_adapter():
                    return sequence_logps(model, b, chunk=cfg.loss_chunk, temperature=cfg.temperature)
        else:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)

            def ref(b: GRPOBatch) -> torch.Tensor:
                return sequence_logps(frozen, b, chunk=cfg.loss_chunk, temperature=cfg.temperature)

    rollouts = Rollouts(model, tokenizer, num_generations=cfg.num_generations,
                        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, quantization=cfg.rollout_quantization,
                        max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                        max_num_seqs=min(64, cfg.batch_size), seed=cfg.seed + info.rank)
    source = GRPOSource(cfg, rows, rollouts, funcs, weights, ref=ref, policy=model, device=info.device)
    if cfg.order_by_reward_variance:
        source.set_order(reward_variance_order(source))
    # a micro-batch row is a prompt plus its completion, not a pretraining bucket
    row = cfg.max_prompt_length + cfg.max_completion_length
    mem = check_memory(model, dataclasses.replace(cfg, packing=True, max_length=row), info)
    logger.info("GRPO: %d prompts, %d completions a step (G=%d), memory estimate %.1f GiB", len(rows),
                source.prompts_per_step * cfg.num_generations, cfg.num_generations, mem["estimate_gb"])

    def after_step(trainer: Trainer) -> dict[str, float]:
        t0 = time.perf_counter()
        rollouts.refresh()
        m = dict(source.metrics)
        m["time/train_s"] = t0 - source.yielded_at
        m["time/refresh_s"] = time.perf_counter() - t0
        if cfg.rollout_quantization != "none":
            m["time/requantize_s"] = rollouts.requantize_s
        return m

    save_model, load_trainable = checkpoint_io(cfg, lm, peft_model)
    trainer = Trainer(cfg, model, source, info, save_model=save_model, load_trainable=load_trainable,
                      flops=linear_flops(model, cfg.lora),
                      objective=lambda m, dtype: GRPOObjective(m, cfg, dtype), after_step=after_step)
    summary = trainer.fit()
    summary["prompts"] = len(rows)
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
