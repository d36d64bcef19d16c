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

Quantized linears (`qwenkit.quant`) are split on their codes, so a rank holds exactly the
corresponding slice of the one-process quantized layer: column-parallel shards take whole output
rows (an int8 row's scale or an int4 row's group scales / zeros travel with it), row-parallel
shards take input columns at int4 group boundaries (a split that would cut a group is refused)
and keep int8's per-row scales. The int8 embedding and head are split on vocabulary rows.
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
from qwenkit.quant.embedding import Int8Embedding
from qwenkit.quant.linear import Int4Linear, Int8Linear, QuantizedLinear

logger = logging.getLogger(__name__)


class TensorParallelError(QwenkitError, ValueError):
    """The model cannot be split `world_size` ways (head counts, int4 groups, unknown modules)."""


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
                _check_module(f"{name}.qkv_proj", module.qkv_proj, MergedLinear)
                _check_module(f"{name}.o_proj", module.o_proj, nn.Linear, n)
            elif isinstance(module, SwiGLU):
                _check_module(f"{name}.gate_up_proj", module.gate_up_proj, MergedLinear)
                _check_module(f"{name}.down_proj", module.down_proj, nn.Linear, n)
        _check_module("model.embed_tokens", model.model.embed_tokens, nn.Embedding)
        _check_module("lm_head", model.lm_head, nn.Linear)


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
        rows = torch.cat([rows, rows.new_zeros(per - (hi - lo), *weight.shape[1:])])
    return rows.clone()


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split across ranks."""

    group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class RowParallelQuantized(nn.Module):
    """`RowParallelLinear` over a quantized layer holding this rank's input columns (no bias):
    y = all_reduce(local(x_local)) + b."""

    def __init__(self, local: QuantizedLinear, bias: torch.Tensor | None, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.local = local
        self.in_features, self.out_features = local.in_features, local.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the embedding; other ids give zeros; summed across ranks.
    `weight`: the float rows, or an `Int8Embedding` of them."""

    def __init__(
        self, weight: torch.Tensor | Int8Embedding, vocab_start: int, vocab_end: int, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        if isinstance(weight, Int8Embedding):
            self.table = weight
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        rows = self.table(local) if hasattr(self, "table") else F.embedding(local, self.weight)
        h = rows * mine.unsqueeze(-1).to(rows.dtype)
        dist.all_reduce(h, group=self.group)
        return h


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered into the full (..., vocab).
    `weight`: the float rows, or a quantized linear of them."""

    def __init__(
        self, weight: nn.Parameter | QuantizedLinear, vocab_size: int, world_size: int, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        if isinstance(weight, QuantizedLinear):
            self.local = weight
        else:
            self.weight = weight
        self.vocab_size, self.world_size = vocab_size, world_size
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = (self.local(h) if hasattr(self, "local") else F.linear(h, self.weight)).contiguous()  # (..., per_rank)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _check_module(name: str, module: nn.Module, float_kind: type, row_split: int | None = None) -> None:
    """`module` is the float kind or a quantized layer; a row-parallel (`row_split` ways) int4
    layer's input columns split at group boundaries."""
    if type(module) is float_kind or isinstance(module, (Int8Linear, Int8Embedding)):
        return
    if isinstance(module, Int4Linear):
        g, k = module.group_size, module.in_features
        if row_split and (k // row_split) % g:
            raise TensorParallelError(
                f"{name}: tensor_parallel_size={row_split} gives each rank {k // row_split} of its {k} input "
                f"columns, which cuts its int4 groups of {g}; use a smaller group size (e.g. int4-g32) or int8"
            )
        return
    raise TensorParallelError(f"tensor parallel cannot split {name}: a {type(module).__name__}")


def _codes(m: QuantizedLinear) -> tuple[torch.Tensor, ...]:
    """The layer's canonical tensors, rows = output channels: int8 (qweight (N, K), fp32
    scales (N,)); int4 (nibbles (N, K/2), scales (N, K/g), zeros (N, K/g))."""
    if isinstance(m, Int8Linear):
        return m.row_major(), m.scales
    st = m.canonical_state()
    return st["qweight"], st["scales"], st["zeros"]


def _quantized(m: QuantizedLinear, codes: tuple[torch.Tensor, ...], bias: torch.Tensor | None, **meta: object) -> QuantizedLinear:
    """A layer of `m`'s format from canonical tensors (repacked for this CPU's kernels)."""
    codes = tuple(c.contiguous() for c in codes)
    if isinstance(m, Int8Linear):
        return Int8Linear(*codes, bias, small_m=m.small_m, **meta)
    return Int4Linear(*codes, m.group_size, bias, small_m=m.small_m, **meta)  # type: ignore[arg-type]


def _quantized_column(m: QuantizedLinear, pieces: list[tuple[int, int]]) -> QuantizedLinear:
    """Rows [a, b) of each fused shard of a quantized layer, in shard order (as `_column`)."""
    offsets = [sum(m.output_sizes[:i]) for i in range(len(m.output_sizes))]
    rows = torch.cat([torch.arange(o + a, o + b) for o, (a, b) in zip(offsets, pieces)])
    codes = tuple(c[rows] for c in _codes(m))
    bias = None if m.bias is None else m.bias.detach()[rows]
    meta = {"output_sizes": tuple(b - a for a, b in pieces), "shard_names": m.shard_names} if m.shard_names else {}
    return _quantized(m, codes, bias, **meta)


def _quantized_row(m: QuantizedLinear, lo: int, hi: int) -> QuantizedLinear:
    """Input columns [lo, hi) of a quantized layer, without bias."""
    if isinstance(m, Int8Linear):
        q, s = _codes(m)
        return _quantized(m, (q[:, lo:hi], s), None)
    q, s, z = _codes(m)
    g = m.group_size
    return _quantized(m, (q[:, lo // 2 : hi // 2], s[:, lo // g : hi // g], z[:, lo // g : hi // g]), None)


def _quantized_vocab_rows(m: QuantizedLinear, lo: int, hi: int, per: int) -> QuantizedLinear:
    """Vocabulary rows [lo, hi) of a quantized head, padded with zero rows to `per`."""
    codes = tuple(_padded_rows(c, lo, hi, per) for c in _codes(m))
    return _quantized(m, codes, None)


def _column(linear: nn.Module, pieces: list[tuple[int, int]]) -> nn.Module:
    """A MergedLinear (or quantized layer) holding rows [a, b) of each shard, in shard order."""
    if isinstance(linear, QuantizedLinear):
        return _quantized_column(linear, pieces)
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


def _row(linear: nn.Module, lo: int, hi: int, group: dist.ProcessGroup | None, rank: int) -> nn.Module:
    if isinstance(linear, QuantizedLinear):
        return RowParallelQuantized(_quantized_row(linear, lo, hi), linear.bias if rank == 0 else None, group)
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
    emb, head = model.model.embed_tokens, model.lm_head
    head_local: nn.Parameter | QuantizedLinear | None = None
    if isinstance(head, QuantizedLinear):
        head_local = _quantized_vocab_rows(head, lo, hi, per)
    if isinstance(emb, Int8Embedding):
        shared = isinstance(head, Int8Linear) and emb.qweight.data_ptr() == head.qweight.data_ptr()
        if shared:  # a tied int8 head and embedding: one table, as in `quant.convert`
            assert isinstance(head_local, Int8Linear)
            table = Int8Embedding(head_local.qweight, head_local.scales, head_local.tile_rows)
        else:
            table = Int8Embedding(_padded_rows(emb.row_major(), lo, hi, per), _padded_rows(emb.scales, lo, hi, per))
        embed = VocabParallelEmbedding(table, lo, hi, group)
    else:
        embed = VocabParallelEmbedding(_padded_rows(emb.weight, lo, hi, per), lo, hi, group)
    model.model.embed_tokens = embed
    if head_local is None:
        tied = config.tie_word_embeddings and hasattr(embed, "weight") and head.weight is emb.weight
        head_local = embed.weight if tied else nn.Parameter(_padded_rows(head.weight, lo, hi, per), requires_grad=False)
    model.lm_head = ParallelLMHead(head_local, vocab, n, group)
    logger.info(
        "tensor parallel rank %d/%d: %d q heads, %d KV heads (of %d), intermediate %d, vocab rows [%d, %d)",
        r, n, q_local, kv_local, hkv, inter, lo, hi,
    )  # fmt: skip
    return model
