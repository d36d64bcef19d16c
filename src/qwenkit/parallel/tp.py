"""Tensor parallelism by module swap (gpt-fast's `tp.py` layout, Megatron's splits).

After `apply_tensor_parallel(model, rank, world_size)` each rank holds:

- `qkv_proj` / `gate_up_proj`: column-parallel, its rows of every fused shard (its q heads, its
  KV heads, its slice of the intermediate size); no communication;
- `o_proj` / `down_proj`: row-parallel (`RowParallelLinear`), its input columns; one all-reduce
  of the output each;
- `embed_tokens`: vocab-parallel (`VocabParallelEmbedding`), its vocabulary rows, one
  all-reduce; `lm_head`: its vocabulary rows (`ParallelLMHead`), the logits all-gathered.

KV heads are split across ranks; when `world_size` exceeds the KV heads each KV head is
replicated on `world_size / num_kv_heads` ranks, each of which holds a slice of its query group.
Only float linears are split: quantized (int8/int4) modules are refused with a clear error.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.layers import MergedLinear, SwiGLU
from qwenkit.model.qwen2 import Qwen2Attention, Qwen2ForCausalLM

logger = logging.getLogger(__name__)


class TensorParallelError(QwenkitError, ValueError):
    """The model cannot be split `world_size` ways (head counts, quantized modules)."""


def check_tensor_parallel(config: ModelConfig, world_size: int, model: nn.Module | None = None) -> None:
    """Raise `TensorParallelError` naming the config field that does not divide, or the module
    of `model` that cannot be split."""
    n = world_size
    if n < 1:
        raise TensorParallelError(f"tensor_parallel_size must be >= 1, got {n}")
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % n:
        raise TensorParallelError(f"tensor_parallel_size={n} does not divide num_attention_heads={hq}")
    if (hkv % n) if n <= hkv else (n % hkv):
        raise TensorParallelError(
            f"tensor_parallel_size={n} and num_key_value_heads={hkv}: one must divide the other"
        )
    if config.intermediate_size % n:
        raise TensorParallelError(
            f"tensor_parallel_size={n} does not divide intermediate_size={config.intermediate_size}"
        )
    if model is not None:
        for name, module in model.named_modules():
            if isinstance(module, Qwen2Attention):
                _check_float(f"{name}.qkv_proj", module.qkv_proj, (MergedLinear,))
                _check_float(f"{name}.o_proj", module.o_proj, (nn.Linear,))
            elif isinstance(module, SwiGLU):
                _check_float(f"{name}.gate_up_proj", module.gate_up_proj, (MergedLinear,))
                _check_float(f"{name}.down_proj", module.down_proj, (nn.Linear,))
        _check_float("model.embed_tokens", model.model.embed_tokens, (nn.Embedding,))
        _check_float("lm_head", model.lm_head, (nn.Linear,))


def local_kv_heads(config: ModelConfig, world_size: int) -> int:
    """KV heads held by each rank (1 when they are replicated)."""
    return max(1, config.num_key_value_heads // world_size)


def _vocab_range(vocab: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(lo, hi, per_rank): rank's rows [lo, hi) of the vocabulary; every rank pads to per_rank."""
    per = -(-vocab // world_size)
    lo = min(rank * per, vocab)
    return lo, min(lo + per, vocab), per


def _padded_rows(weight: torch.Tensor, lo: int, hi: int, per: int) -> torch.Tensor:
    rows = weight.detach()[lo:hi]
    if hi - lo < per:
        rows = torch.cat([rows, rows.new_zeros(per - (hi - lo), weight.shape[1])])
    return rows.clone()


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split across ranks."""

    group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the embedding; other ids give zeros; summed across ranks."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, vocab_end: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        h = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(h, group=self.group)
        return h


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered into the full (..., vocab)."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = weight
        self.vocab_size, self.world_size = vocab_size, world_size
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight).contiguous()  # (..., per_rank)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _check_float(name: str, module: nn.Module, kinds: tuple[type, ...]) -> None:
    if type(module) not in kinds:
        raise TensorParallelError(
            f"tensor parallel splits float weights only; {name} is a {type(module).__name__} "
            "(load with quantization='none')"
        )


def _column(linear: MergedLinear, pieces: list[tuple[int, int]]) -> MergedLinear:
    """A MergedLinear holding rows [a, b) of each shard, in shard order."""
    offsets = [sum(linear.output_sizes[:i]) for i in range(len(linear.output_sizes))]
    sizes = [b - a for a, b in pieces]
    out = MergedLinear(linear.in_features, sizes, linear.shard_names, bias=linear.bias is not None)
    with torch.no_grad():
        w = torch.cat([linear.weight[o + a : o + b] for o, (a, b) in zip(offsets, pieces)])
        out.weight = nn.Parameter(w.clone(), requires_grad=False)
        if linear.bias is not None:
            bias = torch.cat([linear.bias[o + a : o + b] for o, (a, b) in zip(offsets, pieces)])
            out.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return out


def _row(linear: nn.Linear, lo: int, hi: int, group: dist.ProcessGroup | None, rank: int) -> RowParallelLinear:
    out = RowParallelLinear.__new__(RowParallelLinear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = hi - lo, linear.out_features
    out.weight = nn.Parameter(linear.weight.detach()[:, lo:hi].clone(), requires_grad=False)
    bias = linear.bias if rank == 0 else None  # added once, after the sum
    out.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    out.group = group
    return out


@torch.no_grad()
def apply_tensor_parallel(
    model: Qwen2ForCausalLM, rank: int, world_size: int, group: dist.ProcessGroup | None = None
) -> Qwen2ForCausalLM:
    """Keep this rank's shard of every weight, in place; returns the model. The collectives run
    on `group` (None: the default process group), which must be initialised before forward."""
    config = model.config
    check_tensor_parallel(config, world_size, model)
    n, r = world_size, rank
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_local, kv_local = hq // n, local_kv_heads(config, n)
    kv_first = r * hkv // n if n > hkv else r * kv_local  # first KV head of this rank
    inter = config.intermediate_size // n
    for module in list(model.modules()):
        if isinstance(module, Qwen2Attention):
            q_rows = (r * q_local * d, (r + 1) * q_local * d)
            kv_rows = (kv_first * d, (kv_first + kv_local) * d)
            module.qkv_proj = _column(module.qkv_proj, [q_rows, kv_rows, kv_rows])
            module.o_proj = _row(module.o_proj, *q_rows, group, r)
            module.num_heads, module.num_kv_heads = q_local, kv_local
            module.q_size, module.kv_size = q_local * d, kv_local * d
        elif isinstance(module, SwiGLU):
            rows = (r * inter, (r + 1) * inter)
            module.gate_up_proj = _column(module.gate_up_proj, [rows, rows])
            module.down_proj = _row(module.down_proj, *rows, group, r)
            module.intermediate_size = inter
    vocab = config.vocab_size
    lo, hi, per = _vocab_range(vocab, r, n)
    embed = VocabParallelEmbedding(_padded_rows(model.model.embed_tokens.weight, lo, hi, per), lo, hi, group)
    model.model.embed_tokens = embed
    head_weight = embed.weight if config.tie_word_embeddings else nn.Parameter(
        _padded_rows(model.lm_head.weight, lo, hi, per), requires_grad=False
    )
    model.lm_head = ParallelLMHead(head_weight, vocab, n, group)
    logger.info(
        "tensor parallel rank %d/%d: %d q heads, %d KV heads (of %d), intermediate %d, vocab rows [%d, %d)",
        r, n, q_local, kv_local, hkv, inter, lo, hi,
    )  # fmt: skip
    return model
