"""Qwen2-MoE (HF ``model_type: qwen2_moe``): the Qwen2 decoder with routed experts in some layers.

The decoder, attention, norms and loading are `qwen2.py`'s; only the MLP of a sparse layer
differs (`Qwen2MoeSparseMoeBlock`, chosen by `ModelConfig.is_moe_layer`):

    out = sum_k w_k * expert_{i_k}(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

with (w, i) the top-k of softmax(gate(x)) (renormalised to sum 1 when `norm_topk_prob`).

Each expert is a `SwiGLU` (fused gate/up), so the checkpoint names
``mlp.experts.{e}.gate_proj/up_proj/down_proj`` load through the dense loader and the quant
package's module swaps wrap every expert's linears like any other MLP.

CPU path: tokens are grouped by expert (one stable sort of the (token, k) assignments), then each
expert that received tokens runs once on its rows (index_select -> SwiGLU -> index_add_).

Expert parallel: given a torch.distributed group of size EP, a rank holds experts
[rank * E/EP, (rank + 1) * E/EP); every rank routes all tokens (the router is replicated), runs
its own experts and the partial sums are all-reduced before the (replicated) shared expert is added.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from qwenkit.config import ConfigError, ModelConfig
from qwenkit.model.layers import SwiGLU
from qwenkit.model.qwen2 import Qwen2ForCausalLM, Qwen2Model

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(.+)$")
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _ep_rank_world(group: object | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


class Qwen2MoeSparseMoeBlock(nn.Module):
    """Router (``gate``), routed experts (this rank's share), shared expert and its sigmoid gate."""

    def __init__(self, config: ModelConfig, ep_group: object | None = None) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        h = config.hidden_size
        self.num_experts = moe.num_experts
        self.top_k = moe.num_experts_per_tok
        self.norm_topk_prob = moe.norm_topk_prob
        self.output_router_logits = moe.output_router_logits
        rank, world = _ep_rank_world(ep_group)
        if moe.num_experts % world:
            raise ConfigError(
                f"num_experts={moe.num_experts} is not divisible by the expert-parallel size {world}"
            )
        self.ep_group = ep_group
        self.num_local_experts = moe.num_experts // world
        self.expert_start = rank * self.num_local_experts
        self.gate = nn.Linear(h, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(h, moe.moe_intermediate_size) for _ in range(self.num_local_experts)
        )
        self.shared_expert = SwiGLU(h, moe.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # last forward's, when recorded

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> router logits (N, E), top-k weights (N, k) in x's dtype, expert ids (N, k)."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits, weights, ids = self.route(x)
        # kept for the aux loss; cleared otherwise so a later eval never sees stale logits
        self.router_logits = logits if (self.training or self.output_router_logits) else None
        out = self.routed(x, weights, ids)
        if self.ep_group is not None:
            import torch.distributed as dist

            if out.requires_grad:
                # the in-place all-reduce is not differentiable: gradients would be silently wrong
                raise NotImplementedError("expert-parallel Qwen2-MoE runs inference only; train with ep_group=None")
            dist.all_reduce(out, group=self.ep_group)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * expert_{ids[:, k]}(x) over this rank's experts, (N, H)."""
        if x.shape[0] == 1:
            return self._routed_one(x, weights[0], ids[0])
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)  # (N*k,) assignment a belongs to token a // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        lo = self.expert_start
        offset = int(counts[:lo].sum()) if lo else 0
        tokens = order // self.top_k
        w = weights.reshape(-1)[order]
        for j, n in enumerate(counts[lo : lo + self.num_local_experts].tolist()):
            if n == 0:
                continue
            rows = tokens[offset : offset + n]
            y = self.experts[j](x.index_select(0, rows))
            out.index_add_(0, rows, y * w[offset : offset + n, None])
            offset += n
        return out


    def _routed_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token (a decode step): its k experts in ascending id order (the grouped path's
        summation order), without the sort / count / gather machinery."""
        out = None
        lo, n = self.expert_start, self.num_local_experts
        for e, k in sorted(zip(ids.tolist(), range(self.top_k))):
            if lo <= e < lo + n:
                y = self.experts[e - lo](x) * weights[k]
                out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x)


class Qwen2MoeModel(Qwen2Model):
    """The Qwen2 decoder stack with sparse MLPs where `config.is_moe_layer(i)`."""

    def __init__(self, config: ModelConfig, ep_group: object | None = None) -> None:
        def mlp(cfg: ModelConfig, i: int) -> nn.Module | None:
            return Qwen2MoeSparseMoeBlock(cfg, ep_group) if cfg.is_moe_layer(i) else None

        super().__init__(config, mlp)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` over `Qwen2MoeModel`. `ep_group`: a torch.distributed process group to
    split the routed experts across (expert parallel); None keeps them all in this process."""

    def __init__(self, config: ModelConfig, ep_group: object | None = None) -> None:
        if config.moe is None:
            raise ConfigError(f"Qwen2MoeForCausalLM needs a qwen2_moe config, got model_type {config.model_type!r}")
        super().__init__(config, Qwen2MoeModel(config, ep_group))

    def moe_blocks(self) -> list[Qwen2MoeSparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, Qwen2MoeSparseMoeBlock)]

    # ------------------------------------------------------------------ training
    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """The last forward's router logits, one (B*T, E) tensor per sparse layer (recorded in
        training mode or with `output_router_logits`)."""
        logits = tuple(b.router_logits for b in self.moe_blocks())
        return () if any(t is None for t in logits) else logits  # type: ignore[return-value]

    def router_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """router_aux_loss_coef x the load-balancing loss of the last forward, or None when no
        router logits were recorded. `attention_mask` (B, T): 1 for real tokens, 0 for padding."""
        logits = self.router_logits()
        if not logits:
            return None
        moe = self.config.moe
        assert moe is not None
        aux = load_balancing_loss(logits, moe.num_experts, moe.num_experts_per_tok, attention_mask)
        return moe.router_aux_loss_coef * aux

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], adopt: bool = False) -> set[str]:
        """HF-named tensors, experts either per expert (checkpoints) or stacked (transformers'
        in-memory ``mlp.experts.gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I))."""
        return super().load_weights(_per_expert(weights), adopt)

    def _load_tensor(self, name, tensor, params, modules, adopt=False):  # type: ignore[no-untyped-def]
        m = _EXPERT.match(name)
        if m is not None:
            prefix, e, rest = m.groups()
            block = modules.get(prefix.rsplit(".", 1)[0])
            if not isinstance(block, Qwen2MoeSparseMoeBlock):
                raise KeyError(f"checkpoint tensor {name!r} has no matching MoE layer")
            local = int(e) - block.expert_start
            if int(e) >= block.num_experts:
                raise KeyError(f"checkpoint tensor {name!r}: expert {e} >= num_experts={block.num_experts}")
            if not 0 <= local < block.num_local_experts:
                return None  # another expert-parallel rank's expert
            name = f"{prefix}.{local}.{rest}"
        return super()._load_tensor(name, tensor, params, modules, adopt)

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names; experts under their global index."""
        starts = {n: b.expert_start for n, b in self.named_modules() if isinstance(b, Qwen2MoeSparseMoeBlock)}
        for name, t in super().hf_state_dict():
            m = _EXPERT.match(name)
            if m is not None:
                prefix, e, rest = m.groups()
                name = f"{prefix}.{int(e) + starts[prefix.rsplit('.', 1)[0]]}.{rest}"
            yield name, t


def _per_expert(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, which = m.groups()
        for e in range(tensor.shape[0]):
            if which == "gate_up_proj":  # gate rows first, as transformers chunks them
                gate, up = tensor[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
            else:
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all sparse layers (transformers' semantics).

    E * sum_e f_e * P_e, where over every (layer, token) row that the mask keeps f_e is the mean
    number of top-k slots routed to expert e and P_e the mean router probability of e.
    router_logits: per layer (B*T, E); attention_mask (B, T), 1 = real token.
    """
    logits = torch.cat([t.float() for t in router_logits], dim=0)  # (L*N, E)
    probs = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)  # (L*N, k)
    if attention_mask is None:
        keep = torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    else:
        keep = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32).repeat(len(router_logits))
    if keep.numel() != logits.shape[0]:
        raise ValueError(
            f"attention_mask has {keep.numel() // max(len(router_logits), 1)} tokens, router logits "
            f"{logits.shape[0] // max(len(router_logits), 1)} per layer"
        )
    rows = keep.sum()
    slots = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    slots.index_add_(0, chosen.reshape(-1), keep.repeat_interleave(top_k))
    prob_mass = (probs * keep[:, None]).sum(dim=0)
    return num_experts * torch.sum((slots / rows) * (prob_mass / rows))
