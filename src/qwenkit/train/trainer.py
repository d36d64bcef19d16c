"""The trainer loop every recipe shares (pretraining, SFT, LoRA; DPO / GRPO / KD build on it).

One optimizer step = this rank's micro-batches of one global step (`StepLoader`). The loss is a
sum over units (target tokens for LM losses; pairs, sequences ... for other objectives) divided by
the number of units of the whole global step, counted over every micro-batch and rank before the
first backward: the per-unit loss and the update are the same whatever the micro-batch size,
accumulation steps or world size.

An objective is an nn.Module holding the model (what DDP / FSDP2 wrap): `forward(micro_batch)`
returns the loss summed over the micro-batch's units, or `(loss_sum, stats)` where `stats` maps
metric names to sums over the same units (logged as global means). Micro-batches have
`num_units`, `num_tokens` and `to(device)`. Without one, the objective is `CausalLMLoss`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from qwenkit.cpu.allocator import ResidentCap, peak_resident_bytes
from qwenkit.train import checkpoint as ckpt
from qwenkit.train.config import TrainConfig
from qwenkit.train.distributed import DistInfo, all_reduce_sum, barrier, wrap
from qwenkit.train.loss import CausalLMLoss
from qwenkit.train.precision import autocast_context, peak_flops

logger = logging.getLogger(__name__)


class MicroBatch(Protocol):
    @property
    def num_units(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def to(self, device: torch.device | str) -> Any: ...


class StepSource(Protocol):
    """What the loop reads: per optimizer step, this rank's micro-batches."""

    steps_per_epoch: int

    def __iter__(self) -> Iterator[list[MicroBatch]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lr_lambda(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr`, then cosine down to `min_lr` at `total` (a factor of `lr`)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; not norms and biases (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    groups = param_groups(model, cfg.weight_decay)
    # fused AdamW exists for CPU and CUDA in torch >= 2.4; foreach is the fallback
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (activations: one layer's, not all)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        forward = layer.forward

        def run(*args: Any, _f: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        layer.forward = run


def peak_rss_gb() -> float:
    return peak_resident_bytes() / 1024**3


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # non-padding tokens seen, all ranks
    target_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs `cfg` on `model` (a plain `Qwen2ForCausalLM`, possibly with peft LoRA layers injected).

    save_model(folder): writes the weights of a checkpoint (HF folder or adapter); called on
        rank 0 with the model unwrapped.
    load_trainable(folder): restores the trainable weights from a checkpoint (before wrapping).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_data: StepSource,
        info: DistInfo,
        *,
        eval_batches: list[MicroBatch] | None = None,
        save_model: Callable[[nn.Module, Path], None],
        load_trainable: Callable[[nn.Module, Path], None],
        flops: tuple[float, float] = (0.0, 0.0),
        objective: Callable[[nn.Module, torch.dtype | None], nn.Module] | None = None,
        after_step: Callable[[Trainer], dict[str, float] | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.model = model  # the plain module (what is saved)
        self.data = train_data
        self.eval_batches = eval_batches or []
        self.save_model = save_model
        self.load_trainable = load_trainable
        self.flops = flops  # (per token, per target token): the MFU estimate
        self.out = Path(cfg.out)
        self.state = TrainState()
        self.precision = cfg.precision
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * train_data.steps_per_epoch))
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * self.total_steps)
        self.warmup = warmup

        resume_from = ckpt.find_resume(self.out, cfg.resume)
        if resume_from is not None:
            self.load_trainable(model, resume_from)  # before wrapping: every rank reads it
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        compute = torch.bfloat16 if self.precision == "bf16" else None
        if objective is None:
            self.loss_module: nn.Module = CausalLMLoss(model, chunk=cfg.loss_chunk, compute_dtype=compute)
        else:  # a factory: (model, compute dtype) -> the objective module holding `model`
            self.loss_module = objective(model, compute)
        self.loss_module = self.loss_module.to(info.device)
        # after each optimizer step (e.g. invalidating an engine's prefix cache); what it returns is
        # added to the step's metrics (e.g. a rollout source's reward statistics)
        self.after_step = after_step
        self.wrapped = wrap(self.loss_module, info, cfg.fsdp, list(model.model.layers))
        self.optimizer = make_optimizer(self.wrapped, cfg, info.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, warmup=warmup, total=self.total_steps, lr=cfg.lr, min_lr=cfg.min_lr),
        )
        if resume_from is not None:
            self._restore(resume_from)
        self._rss_cap = ResidentCap() if info.device.type == "cpu" else None
        self._metrics_file = None
        self._tb = None
        self._peak = peak_flops(self.precision, info.device) if any(flops) else 0.0

    # ------------------------------------------------------------------ state
    def _restore(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.read_state(folder)
        self.state = TrainState(state["step"], state["tokens"], state["target_tokens"], state.get("history", []))
        optim_full = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(
            self.wrapped, self.optimizer, optim_state_dict=optim_full,
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        self.data.load_state_dict(state["data"])
        rng_file = folder / f"rng_state_{self.info.rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("%s missing: RNG streams start fresh on rank %d", rng_file, self.info.rank)
        logger.info("resumed from %s at step %d", folder, self.state.step)

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        step = self.state.step
        # on the CPU the full state dict holds references, not copies (a 0.5B's AdamW state is 4 GB)
        offload = self.info.device.type != "cpu"
        optim_full = get_optimizer_state_dict(
            self.wrapped, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)
        )
        model_for_save = self._full_model_for_save()
        tmp = self.out / f".tmp-checkpoint-{step:06d}"
        if self.info.is_main:
            tmp = ckpt.begin(self.out, step)
            self.save_model(model_for_save, tmp)
            torch.save(optim_full, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            with open(tmp / "train_config.json", "w") as f:
                json.dump(self.cfg.to_dict(), f, indent=2)
            del optim_full
            ckpt.write_state(tmp, {
                "step": step, "tokens": self.state.tokens, "target_tokens": self.state.target_tokens,
                "data": self.data.state_dict(), "world_size": self.info.world_size,
                "history": self.state.history[-1000:],
            })
        barrier(self.info)
        torch.save(ckpt.rng_state(), tmp / f"rng_state_{self.info.rank}.pt")
        barrier(self.info)
        final = None
        if self.info.is_main:
            final = ckpt.commit(self.out, step, tmp, self.cfg.save_total_limit)
        barrier(self.info)
        return final

    def _full_model_for_save(self) -> nn.Module:
        """The plain model with full tensors (FSDP2 gathers its shards into a CPU copy)."""
        if not self.cfg.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        offload = self.info.device.type != "cpu"
        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        if not self.info.is_main:
            return self.model
        with torch.device("meta"):
            clone = type(self.model)(self.model.config)
        clone = clone.to_empty(device="cpu")
        clone.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False, assign=True)
        if clone.config.tie_word_embeddings:
            clone.lm_head.weight = clone.model.embed_tokens.weight
        return clone

    # ------------------------------------------------------------------ loop
    def _step(self, micro: list[MicroBatch]) -> dict[str, float]:
        local_targets = sum(b.num_units for b in micro)
        local_tokens = sum(b.num_tokens for b in micro)
        global_targets, global_tokens = all_reduce_sum([local_targets, local_tokens], self.info)
        # DDP / FSDP average gradients over ranks: scale back to a sum, then by the global count
        scale = self.info.world_size / max(global_targets, 1.0)
        loss_sum = 0.0
        stat_sums: dict[str, float] = {}
        for i, mb in enumerate(micro):
            mb = mb.to(self.info.device)
            sync = i == len(micro) - 1
            no_sync = getattr(self.wrapped, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            if self.cfg.fsdp and hasattr(self.wrapped, "set_requires_gradient_sync"):
                self.wrapped.set_requires_gradient_sync(sync)
            with ctx, autocast_context(self.precision, self.info.device):
                loss, stats = _split(self.wrapped(mb))
            (loss * scale).backward()
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.wrapped.parameters() if p.requires_grad],
            self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf"),
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(stat_sums)
        total_loss, *totals = all_reduce_sum([loss_sum] + [stat_sums[k] for k in names], self.info)
        out = {
            "loss": total_loss / max(global_targets, 1.0),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens": global_tokens,
            "target_tokens": global_targets,
        }
        out.update({k: v / max(global_targets, 1.0) for k, v in zip(names, totals)})
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Held-out loss per target token (every rank scores its share of the batches)."""
        if not self.eval_batches:
            return None
        self.wrapped.eval()
        loss_sum, count = 0.0, 0
        for b in self.eval_batches[self.info.rank :: self.info.world_size]:
            b = b.to(self.info.device)
            with autocast_context(self.precision, self.info.device):
                loss_sum += float(_split(self.loss_module(b))[0])
            count += b.num_units
        loss_sum, count = all_reduce_sum([loss_sum, count], self.info)
        self.wrapped.train()
        return loss_sum / max(count, 1)

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if not self.info.is_main:
            return
        if self._metrics_file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.out / "metrics.jsonl", "a")
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is None and self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self.cfg.tensorboard = False
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; Ctrl-C (or SIGTERM) saves a checkpoint of the last step."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.wrapped.train()
        summary: dict[str, Any] = {"start_step": self.state.step}
        if self.state.step == 0 or cfg.eval_every:
            ev = self.evaluate()
            if ev is not None:
                summary["eval_loss_start"] = ev
                self._log({"step": self.state.step, "eval_loss": ev})
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=f"{cfg.recipe}",
                   disable=not (self.info.is_main and cfg.progress), dynamic_ncols=True)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        data = iter(self.data)
        t_run = time.perf_counter()
        tokens_run = 0
        try:
            while self.state.step < self.total_steps:
                micro = next(data)
                t0 = time.perf_counter()
                m = self._step(micro)
                if self.after_step is not None:
                    m.update(self.after_step(self) or {})
                dt = time.perf_counter() - t0
                if self._rss_cap is not None:
                    self._rss_cap.check()
                self.state.step += 1
                self.state.tokens += int(m["tokens"])
                self.state.target_tokens += int(m["target_tokens"])
                tokens_run += int(m["tokens"])
                m["tokens_per_s"] = m["tokens"] / dt
                m["step"] = self.state.step
                m["peak_rss_gb"] = peak_rss_gb()
                if self._peak:
                    work = m["tokens"] * self.flops[0] + m["target_tokens"] * self.flops[1]
                    m["mfu"] = work / dt / self._peak
                if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    m["eval_loss"] = self.evaluate()
                if self.state.step % max(cfg.log_every, 1) == 0 or "eval_loss" in m:
                    self._log(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
                if cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < self.total_steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)
            logger.warning("interrupted: saving a checkpoint at step %d", self.state.step)
            summary["interrupted_at"] = self.state.step
            summary["checkpoint"] = str(self.save())
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        elapsed = time.perf_counter() - t_run
        final_eval = self.evaluate()
        if final_eval is not None:
            summary["eval_loss_end"] = final_eval
            self._log({"step": self.state.step, "eval_loss": final_eval})
        summary["checkpoint"] = str(self.save())
        summary.update(step=self.state.step, tokens=self.state.tokens,
                       tokens_per_s=tokens_run / elapsed if elapsed else 0.0, peak_rss_gb=peak_rss_gb())
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tb is not None:
            self._tb.close()
        return summary


def _split(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, {}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
