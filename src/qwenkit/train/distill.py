"""Knowledge distillation: `qwenkit train distill` (teacher -> student, same tokenizer).

loss per target token = kd_ratio * KD + (1 - kd_ratio) * CE, summed over the SFT / pretraining
targets (the same data path and masks as `sft` / `pretrain`) and divided by the step's target count.

* ``kd_loss=kl``: forward KL(teacher_T || student_T) * T^2 with p_T = softmax(logits / T):
  Hinton et al.'s convention; the T^2 keeps the gradient's size (T * (p_s - p_t)) comparable
  across temperatures and with the CE term.
* ``kd_loss=jsd``: the generalized JSD of TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (beta = 0:
  KL(teacher || student), beta = 1: KL(student || teacher), else beta * KL(t || m) + (1 - beta) *
  KL(s || m), m = beta t + (1 - beta) s), on logits / T like TRL, without a T^2 factor (TRL has none).

The LM heads of student and teacher run in chunks of `loss_chunk` target positions with the
gradient computed inside the chunk (as `loss.py`), so at most a few (chunk x vocab) fp32 blocks
exist. A teacher whose vocabulary is larger than the student's is sliced to the student's rows.

Teacher sources: the teacher model on the fly (frozen, fp32 weights, `teacher` setting; with
`fake_quant` and no teacher, the student's own fp32 weights: self-distillation that recovers the
quantization loss), or a top-k cache (`teacher_top_k`): a pre-pass writes the teacher's k
largest log-probs per target position to `teacher_cache/` (safetensors parts, resumable);
training then computes KD on that support with *both* distributions restricted to the k ids
and renormalised (teacher: softmax(logp_k / T), student: softmax(logits_k / T)). With k = vocab
this is the full KD; with smaller k the teacher's tail mass (and the student's mass outside the
k ids) is ignored.

On-policy distillation (TRL GKD's ``lmbda``): with probability ``lmbda`` a step is on-policy: the
student samples a completion (``max_new_tokens``, ``temperature``, top-k / top-p off as TRL's
generation config) for each of the step's documents' prompts (the tokens before its last trained
span) through qwenkit's engine on the trained module (`rollout.Rollouts`, same process, prefix
cache dropped after each optimizer step), the samples replace the dataset's completions, and the
teacher scores them with the same KD loss. The draw and the sampling seeds are functions of
(seed, step), so runs are reproducible and resume exactly.

Held-out metric: in eval mode the objective returns KL(teacher || student) at T = 1 per target
token, so `eval_loss` in metrics.jsonl is the held-out KL to the teacher.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from qwenkit import cpu
from qwenkit.errors import DataError, QwenkitError
from qwenkit.loaders.load import load
from qwenkit.train.attention import DocumentAttention
from qwenkit.train.batch import IGNORE_INDEX, Batch
from qwenkit.train.config import TrainConfig
from qwenkit.train.dataloader import PlannedStep, StepLoader
from qwenkit.train.distributed import DistInfo, barrier
from qwenkit.train.fake_quant import (apply_fake_quant, cached_grids, effective_weight, fake_quant_state,
                                     load_fake_quant_state, refresh_fake_quant, save_fake_quant_checkpoint)
from qwenkit.train.sft_data import Example

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the losses
@dataclass(frozen=True)
class KDSpec:
    kind: str = "kl"  # kl | jsd
    beta: float = 0.5
    temperature: float = 1.0
    kd_ratio: float = 1.0


def kd_per_token(student: torch.Tensor, teacher: torch.Tensor, spec: KDSpec) -> torch.Tensor:
    """(n, V) student and teacher logits (or log-probs) -> (n,) KD loss per position."""
    t_ = spec.temperature
    s = torch.log_softmax(student.float() / t_, dim=-1)
    t = torch.log_softmax(teacher.float() / t_, dim=-1)
    if spec.kind == "kl":
        return (t.exp() * (t - s)).sum(-1) * (t_ * t_)
    beta = spec.beta
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


# teacher(start, stop) -> ("logits", (c, V) teacher logits) or ("topk", ids (c, k), log-probs (c, k))
TeacherFn = Callable[[int, int], tuple]


class _DistillHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                teacher: TeacherFn, spec: KDSpec, chunk: int, compute_dtype: torch.dtype):
        """hidden (N, H), weight (V, H), targets (N,) -> (loss sum, kd sum, ce sum), fp32 scalars."""
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_sum = torch.zeros_like(total)
        ce_sum = torch.zeros_like(total)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.detach().to(compute_dtype)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                h = hidden[s:e].detach().to(compute_dtype)
                with torch.enable_grad():
                    z = (h @ w.t()).float().requires_grad_(need_h or need_w)
                    src = teacher(s, e)
                    if src[0] == "logits":
                        kd = kd_per_token(z, src[1], spec)
                    else:
                        ids, logp = src[1], src[2]
                        kd = kd_per_token(z.gather(1, ids), logp, spec)
                    ce = -torch.log_softmax(z, dim=-1).gather(1, targets[s:e, None]).squeeze(1)
                    loss = spec.kd_ratio * kd.sum() + (1.0 - spec.kd_ratio) * ce.sum()
                    if need_h or need_w:
                        (g,) = torch.autograd.grad(loss, z)
                        g = g.to(compute_dtype)
                        if grad_h is not None:
                            grad_h[s:e] = (g @ w).to(hidden.dtype)
                        if grad_w is not None:
                            grad_w += (g.t() @ h).float()
                total += loss.detach()
                kd_sum += kd.detach().sum()
                ce_sum += ce.detach().sum()
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _g1: Any, _g2: Any):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def distill_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher: TeacherFn,
                      spec: KDSpec, chunk: int = 512, compute_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Summed (loss, KD, CE) over N target positions (hidden (N, H), all targets valid)."""
    return _DistillHead.apply(hidden, weight, targets, teacher, spec, chunk, compute_dtype or hidden.dtype)


# ---------------------------------------------------------------------------- batches
@dataclass
class DistillBatch(Batch):
    """A `Batch` plus the cached teacher top-k of its target positions, in the order of
    ``targets != IGNORE_INDEX`` (row-major): ids (N, k) int64, log-probs (N, k) fp32."""

    teacher_ids: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> DistillBatch:
        b = super().to(device)
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return DistillBatch(b.input_ids, b.targets, b.position_ids, b.document_ids,
                            move(self.teacher_ids), move(self.teacher_logprobs))  # fmt: skip


class DistillObjective(nn.Module):
    """Student (`self.model`, what DDP / FSDP wrap) + a frozen teacher kept out of the module tree."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, spec: KDSpec, chunk: int = 512,
                 compute_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self._teacher = [teacher]  # a list: not a submodule (no gradients, not saved, not wrapped)
        self.spec = spec
        self.chunk = chunk
        self.compute_dtype = compute_dtype

    def _apply(self, fn: Any, recurse: bool = True) -> DistillObjective:  # .to(device) moves the teacher too
        super()._apply(fn, recurse)
        if self._teacher[0] is not None:
            self._teacher[0]._apply(fn)
        return self

    def forward(self, b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attn = DocumentAttention(b.document_ids)
        hidden = self.model.hidden_states(b.input_ids, b.position_ids, attn)
        keep = b.targets != IGNORE_INDEX
        h, tgt = hidden[keep], b.targets[keep]
        if h.shape[0] == 0:
            zero = hidden.sum() * 0.0
            return zero, {"kd_loss": zero.detach(), "ce_loss": zero.detach()}
        weight = effective_weight(self.model.lm_head)
        vocab = weight.shape[0]
        # eval: the held-out KL(teacher || student) at T = 1
        spec = self.spec if self.training else KDSpec("kl", temperature=1.0, kd_ratio=1.0)
        cached = getattr(b, "teacher_ids", None)
        if cached is not None:
            ids, logp = cached, b.teacher_logprobs
            if ids.shape[0] != h.shape[0]:
                raise QwenkitError(f"teacher cache gives {ids.shape[0]} positions for a batch of {h.shape[0]} targets")

            def teacher_fn(s: int, e: int) -> tuple:
                return ("topk", ids[s:e], logp[s:e])
        else:
            teacher = self._teacher[0]
            if teacher is None:
                raise QwenkitError("no teacher model and no cached teacher log-probs for this batch")
            with torch.no_grad():
                th = teacher.hidden_states(b.input_ids, b.position_ids, DocumentAttention(b.document_ids))[keep]
                tw = effective_weight(teacher.lm_head)
                if tw.shape[0] < vocab:
                    raise QwenkitError(f"the teacher's vocabulary ({tw.shape[0]}) is smaller than the student's ({vocab})")
                tw = tw[:vocab]  # a larger teacher vocabulary: the student's ids only
            cd = self.compute_dtype or th.dtype

            def teacher_fn(s: int, e: int) -> tuple:
                with torch.no_grad(), torch.autocast(device_type=th.device.type, enabled=False):
                    return ("logits", (th[s:e].to(cd) @ tw.to(cd).t()).float())
        loss, kd, ce = distill_head_loss(h, weight, tgt, teacher_fn, spec, self.chunk, self.compute_dtype)
        return loss, {"kd_loss": kd, "ce_loss": ce}


# ---------------------------------------------------------------------------- top-k cache
CACHE_META = "meta.json"
SEGMENTS_PER_PART = 256


def _segment_targets(ex: Any) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, targets) of one segment as `collate` builds them."""
    ids = np.asarray(ex.input_ids, dtype=np.int64)
    labels = np.asarray(ex.labels, dtype=np.int64)
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = labels[1:]
    return ids, targets


def data_fingerprint(loader: StepLoader) -> str:
    h = hashlib.sha256()
    for seg in loader._segments:
        ids, targets = _segment_targets(loader._example(seg))
        h.update(np.asarray(seg, dtype=np.int64).tobytes())
        h.update(ids.tobytes())
        h.update(targets.tobytes())
    return h.hexdigest()


class TopKCache:
    """The teacher's top-k log-probs per target position of each segment of a `StepLoader`.

    Folder: ``meta.json`` (k, vocab, teacher, data fingerprint, segment count) and parts
    ``part-NNNNNN.safetensors`` of `SEGMENTS_PER_PART` segments each: ``ids`` int32 (n, k),
    ``logprobs`` fp32 (n, k) (log-softmax over the student's vocabulary at T = 1, largest first),
    ``offsets`` int64 (segments + 1,) into those rows. A part is written to a temporary name and
    renamed, so an interrupted pre-pass resumes at the first missing part."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / CACHE_META
        if not meta_file.is_file():
            raise DataError(f"{meta_file}: no teacher cache here")
        self.meta = json.loads(meta_file.read_text())
        self._parts: dict[int, Any] = {}

    @staticmethod
    def part_file(folder: Path, p: int) -> Path:
        return folder / f"part-{p:06d}.safetensors"

    @classmethod
    @torch.no_grad()
    def build(cls, folder: str | Path, loader: StepLoader, teacher: nn.Module, *, k: int, vocab: int,
              teacher_name: str, chunk: int = 512, info: DistInfo | None = None) -> TopKCache:  # fmt: skip
        from safetensors.torch import save_file

        folder = Path(folder)
        rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
        device = next(teacher.parameters()).device
        segments = loader._segments
        meta = {"k": k, "vocab": vocab, "teacher": teacher_name, "num_segments": len(segments),
                "segments_per_part": SEGMENTS_PER_PART, "fingerprint": data_fingerprint(loader)}  # fmt: skip
        meta_file = folder / CACHE_META
        if meta_file.is_file():
            old = json.loads(meta_file.read_text())
            diff = [key for key in meta if old.get(key) != meta[key]]
            if diff:
                raise DataError(f"{meta_file}: this teacher cache was built for other settings or data ({', '.join(diff)} "
                                f"differ: {[old.get(x) for x in diff]} vs {[meta[x] for x in diff]}); "
                                "remove it or set teacher_cache to a new folder")
        elif rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = meta_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, meta_file)
        if info is not None:
            barrier(info)
        tw = effective_weight(teacher.lm_head)[:vocab].float()
        parts = -(-len(segments) // SEGMENTS_PER_PART)
        done = 0
        for p in range(rank, parts, world):
            target = cls.part_file(folder, p)
            if target.is_file():
                continue
            all_ids, all_logp, offsets = [], [], [0]
            for seg in segments[p * SEGMENTS_PER_PART : (p + 1) * SEGMENTS_PER_PART]:
                ids, targets = _segment_targets(loader._example(seg))
                keep = torch.from_numpy(targets != IGNORE_INDEX)
                x = torch.from_numpy(ids)[None].to(device)
                h = teacher.hidden_states(x, torch.arange(len(ids), device=device)[None],
                                          DocumentAttention(torch.zeros_like(x)))[0][keep.to(device)].float()
                for s in range(0, h.shape[0], chunk):
                    logp = torch.log_softmax(h[s : s + chunk] @ tw.t(), dim=-1)
                    v, i = logp.topk(k, dim=-1)
                    all_ids.append(i.to(torch.int32).cpu())
                    all_logp.append(v.cpu())
                offsets.append(offsets[-1] + int(keep.sum()))
            tensors = {"ids": torch.cat(all_ids) if all_ids else torch.zeros(0, k, dtype=torch.int32),
                       "logprobs": torch.cat(all_logp) if all_logp else torch.zeros(0, k),
                       "offsets": torch.tensor(offsets, dtype=torch.int64)}  # fmt: skip
            tmp = target.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, target)
            done += 1
        logger.info("teacher top-%d cache %s: %d parts written, %d present", k, folder, done, parts - done)
        if info is not None:
            barrier(info)
        return cls(folder)

    def segment(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 (n, k), log-probs fp32 (n, k)) of segment j's target positions."""
        from safetensors import safe_open

        per = self.meta["segments_per_part"]
        p, local = divmod(j, per)
        if p not in self._parts:
            f = self.part_file(self.folder, p)
            if not f.is_file():
                raise DataError(f"{f}: teacher cache part missing (rebuild the cache: the pre-pass resumes)")
            self._parts[p] = safe_open(str(f), framework="pt")
        part = self._parts[p]
        offsets = part.get_slice("offsets")
        a, b = int(offsets[local : local + 1][0]), int(offsets[local + 1 : local + 2][0])
        return part.get_slice("ids")[a:b].long(), part.get_slice("logprobs")[a:b].float()


# ---------------------------------------------------------------------------- on-policy (GKD)
def prompt_length(labels: Any) -> int:
    """Tokens before the document's last trained span (TRL GKD's prompt: every turn but the last
    completion); 0 when nothing is trained."""
    lab = np.asarray(labels)
    trained = np.flatnonzero(lab != IGNORE_INDEX)
    if trained.size == 0:
        return 0
    j = int(trained[-1])
    while j > 0 and lab[j - 1] != IGNORE_INDEX:
        j -= 1
    return j


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether step `step` (0-based) of a run seeded `seed` is on-policy: u < lmbda, u uniform."""
    if lmbda <= 0.0:
        return False
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return float(torch.rand((), generator=g, dtype=torch.float64)) < lmbda


class OnPolicy:
    """With probability `lmbda` per step, the step's completions are the student's own samples.

    `chooses(step)` is a function of (seed, step) (the same on every rank, as TRL's seeded
    `random.random() <= lmbda`); the engine's sampling seeds of a step are too (and of the rank),
    so a resumed run samples what a straight run would."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, lmbda: float, max_new_tokens: int, temperature: float,
                 max_length: int, max_num_seqs: int = 64, seed: int = 0, rank: int = 0, precision: str = "fp32",
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        from qwenkit.train.rollout import Rollouts

        self.model = model
        self.lmbda = lmbda
        self.seed = seed
        self.rank = rank
        self.precision = precision
        self.device = torch.device(device)
        self.rollouts = Rollouts(model, tokenizer, num_generations=1, max_completion_length=max_new_tokens,
                                 temperature=temperature, top_p=1.0, top_k=0, max_model_len=max_length + max_new_tokens,
                                 max_num_seqs=max_num_seqs, seed=seed)  # fmt: skip
        self.metrics: dict[str, float] = {}
        self.last: Any = None  # the last RolloutBatch

    def chooses(self, step: int) -> bool:
        return on_policy_step(self.seed, step, self.lmbda)

    def replace(self, docs: list[Example], step: int) -> list[Example]:
        """docs with their last completion replaced by the student's sample (docs without a prompt
        or without targets are kept)."""
        from qwenkit.train.precision import autocast_context

        which = [i for i, d in enumerate(docs) if 0 < prompt_length(d.labels)]
        prompts = [list(map(int, docs[i].input_ids[: prompt_length(docs[i].labels)])) for i in which]
        self.rollouts.generator.manual_seed((self.seed * 1_000_003 + step) * 1024 + self.rank)
        with autocast_context(self.precision, self.device), cached_grids(self.model):
            batch = self.rollouts.generate(prompts) if prompts else None
        out = list(docs)
        if batch is None:
            self.metrics = {"on_policy": 1.0}
            return out
        for i, p, c in zip(which, prompts, batch.completion_ids):
            out[i] = Example(p + list(c), [IGNORE_INDEX] * len(p) + list(c))
        self.last = batch
        lengths = [len(c) for c in batch.completion_ids]
        self.metrics = {"on_policy": 1.0, "completions/mean_length": float(np.mean(lengths)),
                        "completions/clipped_ratio": float(np.mean([r == "length" for r in batch.finish_reasons])),
                        "time/generate_s": batch.seconds}  # fmt: skip
        return out


class DistillLoader(StepLoader):
    """A StepLoader whose micro-batches carry the cached teacher top-k of their targets, or whose
    completions are the student's samples on the steps `on_policy` chooses."""

    def __init__(self, source: Any, cache: TopKCache | None = None, on_policy: OnPolicy | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(source, **kwargs)
        self.cache = cache
        self.on_policy = on_policy
        self._seg_index = {seg: j for j, seg in enumerate(self._segments)}

    def _on_policy_batches(self, step: PlannedStep, index: int) -> list[Batch]:
        from qwenkit.train.packing import collate

        rows: list[tuple] = list(step.rows)
        rows += [()] * (-len(rows) % (self.world_size * self.micro_batch_size))
        mine = rows[self.rank :: self.world_size]
        docs = [[self._example(seg) for seg in row] for row in mine]
        flat = self.on_policy.replace([d for row in docs for d in row], index)  # type: ignore[union-attr]
        new_rows, k = [], 0
        for row in docs:
            new_rows.append(flat[k : k + len(row)])
            k += len(row)
        # rows keep their documents; a row may outgrow the planned length: pad to the longest
        return [collate(new_rows[s : s + self.micro_batch_size])
                for s in range(0, len(new_rows), self.micro_batch_size)]

    def attach(self, cache: TopKCache) -> None:
        if cache.meta["num_segments"] != len(self._segments):
            raise DataError(f"{cache.folder}: cache has {cache.meta['num_segments']} segments, the data "
                            f"{len(self._segments)}")
        self.cache = cache

    def rank_micro_batches(self, step: PlannedStep) -> list[Batch]:
        if self.on_policy is not None:
            index = self.steps_done - 1  # __iter__ counts the step before building it
            if self.on_policy.chooses(index):
                return self._on_policy_batches(step, index)
            self.on_policy.metrics = {"on_policy": 0.0}
        batches = super().rank_micro_batches(step)
        if self.cache is None:
            return batches
        rows: list[tuple] = list(step.rows)
        rows += [()] * (-len(rows) % (self.world_size * self.micro_batch_size))
        mine = rows[self.rank :: self.world_size]
        out: list[Batch] = []
        for i, b in enumerate(batches):
            segs = [seg for row in mine[i * self.micro_batch_size : (i + 1) * self.micro_batch_size] for seg in row]
            got = [self.cache.segment(self._seg_index[seg]) for seg in segs]
            k = self.cache.meta["k"]
            ids = torch.cat([g[0] for g in got]) if got else torch.zeros(0, k, dtype=torch.long)
            logp = torch.cat([g[1] for g in got]) if got else torch.zeros(0, k)
            if ids.shape[0] != b.num_target_tokens:
                raise DataError(f"{self.cache.folder}: {ids.shape[0]} cached positions for a micro-batch with "
                                f"{b.num_target_tokens} targets (a stale cache? remove it)")
            out.append(DistillBatch(b.input_ids, b.targets, b.position_ids, b.document_ids, ids, logp))
        return out


# ---------------------------------------------------------------------------- the recipe
def load_frozen(spec: str, info: DistInfo, progress: bool) -> Any:
    lm = load(spec, dtype=torch.float32, device=info.device, progress=progress)
    model = cpu.uninstall(lm.model).eval()
    model.requires_grad_(False)
    return lm, model


def load_student(cfg: TrainConfig, info: DistInfo) -> tuple[Any, nn.Module, Any]:
    """`recipes.load_training_model`, with fake quantization applied before any bf16 cast of
    frozen weights (the grid must come from the fp32 weights)."""
    from qwenkit.train.recipes import load_training_model

    if not cfg.fake_quant:
        return load_training_model(cfg, info)
    lm = load(cfg.model, dtype=torch.float32, device=info.device, progress=cfg.progress and info.is_main)
    model = cpu.uninstall(lm.model)
    peft_model = None
    if cfg.lora:
        from qwenkit.train.lora import prepare_lora

        peft_model = prepare_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=cfg.lora_targets)
        model = peft_model.get_base_model()
    apply_fake_quant(model, cfg.fake_quant, search=False)  # searched in run_recipe unless restored
    return lm, model.train(), peft_model


FAKE_QUANT_STATE = "fake_quant/grid.safetensors"  # a subfolder: the HF loaders read every top-level .safetensors
QUANTIZED_DIR = "quantized"


def fake_quant_io(model: nn.Module, lm: Any, save_model: Callable, load_trainable: Callable) -> tuple[Callable, Callable]:
    """Checkpoints of a fake-quant run also hold the grid parameters (exact resume) and the
    trained grid as a qwenkit quantized checkpoint in ``quantized/``."""
    from safetensors.torch import load_file, save_file

    def save(m: nn.Module, folder: Path) -> None:
        save_model(m, folder)
        (folder / FAKE_QUANT_STATE).parent.mkdir(exist_ok=True)
        save_file(fake_quant_state(model), str(folder / FAKE_QUANT_STATE))
        save_fake_quant_checkpoint(model, folder / QUANTIZED_DIR, tokenizer=lm.tokenizer,
                                   generation=lm.generation_defaults)

    def load(m: nn.Module, folder: Path) -> None:
        load_trainable(m, folder)
        f = folder / FAKE_QUANT_STATE
        if f.is_file():
            load_fake_quant_state(model, load_file(str(f)), str(f))
        else:
            logger.warning("%s missing: the grid is searched on the checkpoint's weights", f)
            refresh_fake_quant(model)

    return save, load


def run_recipe(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    from qwenkit.train.recipes import (check_memory, checkpoint_io, eval_batches, linear_flops, start_run,
                                       step_loader, training_documents)
    from qwenkit.train.trainer import Trainer

    out = start_run(cfg, info)
    lm, model, peft_model = load_student(cfg, info)
    tokenizer = lm.tokenizer
    teacher_name = cfg.teacher or str(cfg.model)
    t_lm, teacher = load_frozen(teacher_name, info, cfg.progress and info.is_main)
    if t_lm.tokenizer.vocab_size != tokenizer.vocab_size:
        raise QwenkitError(f"teacher {teacher_name} has a tokenizer of {t_lm.tokenizer.vocab_size} tokens, the "
                           f"student {cfg.model} {tokenizer.vocab_size}: distillation needs the same tokenizer")
    vocab = model.lm_head.weight.shape[0]
    if teacher.lm_head.weight.shape[0] < vocab:
        raise QwenkitError(f"teacher {teacher_name}: vocabulary {teacher.lm_head.weight.shape[0]} < student's {vocab}")

    train_docs, held, data_stats = training_documents(cfg, tokenizer)
    loader = step_loader(DistillLoader, train_docs, cfg, info)
    evals = eval_batches(held, cfg) if held is not None else None
    if cfg.teacher_top_k:
        folder = Path(cfg.teacher_cache or out / "teacher_topk")
        k = min(cfg.teacher_top_k, vocab)
        loader.attach(TopKCache.build(folder, loader, teacher, k=k, vocab=vocab, teacher_name=teacher_name,
                                      chunk=cfg.loss_chunk, info=info))
        if held is not None:  # held-out KL on the cached support too; the teacher is not kept
            ev_loader = DistillLoader(held, max_length=cfg.max_length, packing=cfg.packing, batch_size=cfg.batch_size,
                                      token_budget=cfg.token_budget, buckets=None if cfg.packing else cfg.bucket_lengths,
                                      micro_batch_size=cfg.micro_batch_size, shuffle=False, pad_to_longest=True)
            ev_loader.attach(TopKCache.build(folder / "eval", ev_loader, teacher, k=k, vocab=vocab,
                                             teacher_name=teacher_name, chunk=cfg.loss_chunk, info=info))
            evals = [b for _, micro in zip(range(ev_loader.steps_per_epoch), ev_loader) for b in micro
                     if b.num_target_tokens]  # fmt: skip
        teacher = None
        del t_lm
    if cfg.lmbda > 0:
        loader.on_policy = OnPolicy(model, tokenizer, lmbda=cfg.lmbda, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, max_length=cfg.max_length,
                                    max_num_seqs=min(64, cfg.batch_size), seed=cfg.seed, rank=info.rank,
                                    precision=cfg.precision, device=info.device)  # fmt: skip
    mem = check_memory(model, cfg, info)
    logger.info("data: %s; %d steps an epoch; memory estimate %.1f GiB (student)", data_stats,
                loader.steps_per_epoch, mem["estimate_gb"])
    spec = KDSpec(cfg.kd_loss, cfg.beta, cfg.temperature, cfg.kd_ratio)
    save_model, load_trainable = checkpoint_io(cfg, lm, peft_model)
    if cfg.fake_quant:
        save_model, load_trainable = fake_quant_io(model, lm, save_model, load_trainable)

    def after_step(trainer: Trainer) -> dict[str, float]:
        m: dict[str, float] = {}
        done = trainer.state.step + 1  # the step just finished (counted after this hook)
        if cfg.fake_quant and cfg.fake_quant_refresh and done % cfg.fake_quant_refresh == 0:
            t0 = time.perf_counter()
            refresh_fake_quant(model)
            m["time/fake_quant_search_s"] = time.perf_counter() - t0
        if loader.on_policy is not None:
            loader.on_policy.rollouts.refresh()  # the engine's cached KV came from the old weights
            m.update(loader.on_policy.metrics)
        return m

    trainer = Trainer(cfg, model, loader, info, eval_batches=evals, save_model=save_model,
                      load_trainable=load_trainable, flops=linear_flops(model, cfg.lora),
                      objective=lambda m, compute: DistillObjective(m, teacher, spec, cfg.loss_chunk, compute),
                      after_step=after_step)
    if cfg.fake_quant and any(getattr(m, "fq_scales", 0) is None for m in model.modules()):
        t0 = time.perf_counter()  # a fresh run (a resumed one restored the grid): qwenkit's search, once
        refresh_fake_quant(model)
        logger.info("fake quantization: grid searched in %.1f s", time.perf_counter() - t0)
    summary = trainer.fit()
    for key in ("eval_loss_start", "eval_loss_end"):  # in eval mode the objective returns the KL
        if key in summary:
            summary[key.replace("loss", "kl")] = summary[key]
    summary["data"] = data_stats
    summary["memory_estimate_gb"] = mem["estimate_gb"]
    if cfg.fake_quant:
        summary["fake_quant"] = cfg.fake_quant
        summary["export"] = (f"checkpoint/{QUANTIZED_DIR}: the trained grid as a qwenkit quantized checkpoint "
                             "(loads without re-quantizing)")
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
