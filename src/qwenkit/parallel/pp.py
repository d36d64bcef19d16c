"""Pipeline parallelism by layer ranges: stage r holds decoder layers [lo_r, hi_r).

Rank 0 also keeps the embedding, the final norm and `lm_head`: it embeds, runs its layers, sends
the hidden states to rank 1, and receives the last stage's output back, so logits and sampling
stay on rank 0. The engine splits a step into micro-batches (`run_first_stage` / `run_stage`):
stage s works on micro-batch i while stage s + 1 works on i - 1. Every receive is posted before
any compute and every send is asynchronous (tag = micro-batch index), so no schedule of the
stages can deadlock. Each stage's attention modules are renumbered 0..n-1, so its KV cache
holds only its layers.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from qwenkit.model.attention import AttentionBackend
from qwenkit.model.qwen2 import Qwen2ForCausalLM, Qwen2Model
from qwenkit.parallel.tp import TensorParallelError

logger = logging.getLogger(__name__)


class MicroBatch(NamedTuple):
    """One micro-batch of a step: its flat tokens (input_ids only needed on rank 0)."""

    input_ids: torch.Tensor | None  # (n,)
    positions: torch.Tensor  # (n,)
    attn_metadata: AttentionBackend | None
    rope_factor_index: torch.Tensor | None = None  # (n,)


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


def _wait(works: list[Any]) -> None:
    for w in works:
        w.wait()


def run_first_stage(model: Qwen2ForCausalLM, micro: list[MicroBatch]) -> torch.Tensor:
    """Rank 0's share of a pipelined step: embed and run its layers on each micro-batch in turn,
    sending each on as soon as it is done; returns the final-normed hidden states (N, hidden)
    of all micro-batches, in order, from the last stage."""
    inner = model.model
    assert isinstance(inner, PipelineStage0Model), "apply_pipeline_parallel(model, 0, ...) first"
    world, group = inner.pp_world_size, inner.pp_group
    dtype = next(inner.parameters()).dtype
    dev = micro[0].positions.device
    outs = [torch.empty(1, mb.positions.numel(), model.config.hidden_size, dtype=dtype, device=dev) for mb in micro]
    recvs = [dist.irecv(o, src=world - 1, group=group, tag=i) for i, o in enumerate(outs)]
    sends = []
    try:
        for i, mb in enumerate(micro):
            h = inner.embed_tokens(mb.input_ids.unsqueeze(0))  # (1, n, hidden)
            rfi = None if mb.rope_factor_index is None else mb.rope_factor_index.unsqueeze(0)
            rope = inner.rotary_emb(mb.positions.unsqueeze(0), h.dtype, rfi)
            for layer in inner.layers:
                h = layer(rope, h, mb.attn_metadata)
            sends.append(dist.isend(h.contiguous(), dst=1, group=group, tag=i))
        _wait(recvs)
    finally:
        _wait(sends)  # the buffers must outlive their sends (no-op when already done)
    return torch.cat([inner.norm(o) for o in outs], dim=1)[0]


def run_stage(
    model: Qwen2ForCausalLM, micro: list[MicroBatch], rank: int, world_size: int,
    group: dist.ProcessGroup | None = None,
) -> None:
    """A stage > 0's share of a step: per micro-batch, receive the hidden states, run its
    layers, send them on (the last stage back to rank 0); all receives are posted first."""
    inner = model.model
    dtype = next(inner.parameters()).dtype
    hidden = model.config.hidden_size
    bufs = [torch.empty(1, mb.positions.numel(), hidden, dtype=dtype, device=mb.positions.device) for mb in micro]
    recvs = [dist.irecv(b, src=rank - 1, group=group, tag=i) for i, b in enumerate(bufs)]
    sends = []
    try:
        for i, (mb, h, r) in enumerate(zip(micro, bufs, recvs)):
            r.wait()
            rfi = None if mb.rope_factor_index is None else mb.rope_factor_index.unsqueeze(0)
            rope = inner.rotary_emb(mb.positions.unsqueeze(0), dtype, rfi)
            for layer in inner.layers:
                h = layer(rope, h, mb.attn_metadata)
            sends.append(dist.isend(h.contiguous(), dst=(rank + 1) % world_size, group=group, tag=i))
    finally:
        _wait(sends)


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
