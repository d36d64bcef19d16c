"""Pipeline parallelism by layer ranges: stage r holds decoder layers [lo_r, hi_r).

Rank 0 also keeps the embedding, the final norm and `lm_head`: it embeds, runs its layers, sends
the hidden states to rank 1, and receives the last stage's output back, so logits and sampling
stay on rank 0. One batch is in flight at a time (no micro-batches: stages do not overlap yet).
Each stage's attention modules are renumbered 0..n-1, so its KV cache holds only its layers.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from qwenkit.model.attention import AttentionBackend
from qwenkit.model.qwen2 import Qwen2ForCausalLM, Qwen2Model
from qwenkit.parallel.tp import TensorParallelError

logger = logging.getLogger(__name__)


def stage_layers(num_layers: int, rank: int, world_size: int) -> tuple[int, int]:
    """Layers [lo, hi) of stage `rank`: an even split, the first stages one longer."""
    if world_size > num_layers:
        raise TensorParallelError(
            f"pipeline_parallel_size={world_size} exceeds num_hidden_layers={num_layers}"
        )
    base, extra = divmod(num_layers, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class PipelineStage0Model(Qwen2Model):
    """Rank 0's decoder: its layers, then the other stages' (over send/recv), then the norm."""

    pp_world_size: int = 1
    pp_group: dist.ProcessGroup | None = None

    def run_layers(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_metadata: AttentionBackend | None
    ) -> torch.Tensor:
        for layer in self.layers:
            h = layer(rope, h, attn_metadata)
        h = h.contiguous()
        dist.send(h, dst=1, group=self.pp_group)
        dist.recv(h, src=self.pp_world_size - 1, group=self.pp_group)
        return self.norm(h)


def run_stage(
    model: Qwen2ForCausalLM, positions: torch.Tensor, num_tokens: int, attn_metadata: AttentionBackend,
    rank: int, world_size: int, group: dist.ProcessGroup | None = None,
) -> None:
    """A stage > 0's share of one step: receive the hidden states, run its layers, pass them on
    (the last stage back to rank 0)."""
    inner = model.model
    dtype = next(inner.parameters()).dtype
    h = torch.empty(1, num_tokens, model.config.hidden_size, dtype=dtype, device=positions.device)
    dist.recv(h, src=rank - 1, group=group)
    rope = inner.rotary_emb(positions.unsqueeze(0), dtype)
    for layer in inner.layers:
        h = layer(rope, h, attn_metadata)
    dist.send(h.contiguous(), dst=(rank + 1) % world_size, group=group)


@torch.no_grad()
def apply_pipeline_parallel(
    model: Qwen2ForCausalLM, rank: int, world_size: int, group: dist.ProcessGroup | None = None
) -> Qwen2ForCausalLM:
    """Keep stage `rank`'s layers (renumbered from 0) in place; rank 0 keeps the embedding,
    norm and head, the others drop them. Returns the model."""
    config = model.config
    lo, hi = stage_layers(config.num_hidden_layers, rank, world_size)
    inner = model.model
    inner.layers = nn.ModuleList(list(inner.layers)[lo:hi])
    for i, layer in enumerate(inner.layers):
        layer.self_attn.layer_idx = i
    if rank == 0:
        if type(inner) is not Qwen2Model:
            raise TensorParallelError(f"pipeline parallel needs the plain Qwen2Model, got {type(inner).__name__}")
        inner.__class__ = PipelineStage0Model
        inner.pp_world_size, inner.pp_group = world_size, group
    else:
        inner.embed_tokens = None
        inner.norm = None
        model.lm_head = None
    logger.info("pipeline stage %d/%d: layers [%d, %d)", rank, world_size, lo, hi)
    return model
