"""Next-token loss without materialising (tokens x vocab) logits.

The LM head and cross-entropy run in chunks of rows inside one autograd function that computes
the gradients while the chunk's logits exist (as Liger's fused linear cross-entropy does), so
peak memory is one (chunk x vocab) block instead of T x 151,936 fp32 logits and their softmax.
Only positions with a target are scored: prompt tokens in SFT never reach the LM head.
"""
from __future__ import annotations

import torch
from torch import nn

from qwenkit.train.attention import DocumentAttention
from qwenkit.train.batch import IGNORE_INDEX, Batch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """hidden (N, H), weight (V, H), targets (N,) all valid -> summed loss (fp32 scalar)."""
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty(0) if need_w else None  # set from the first chunk
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.detach().to(compute_dtype)
            rows = torch.arange(min(chunk, n), device=hidden.device)
            for s in range(0, n, chunk):
                h = hidden[s : s + chunk].detach().to(compute_dtype)
                tgt = targets[s : s + chunk]
                logits = h @ w.t()  # (c, V)
                # one fused pass for the normaliser (fp32), then exp in place for the gradient
                logp = torch.log_softmax(logits.float(), dim=-1)
                del logits
                loss -= logp.gather(1, tgt[:, None]).sum()
                if need_h or need_w:
                    g = logp.exp_()  # softmax
                    g[rows[: len(tgt)], tgt] -= 1.0
                    g = g.to(compute_dtype)
                    if grad_h is not None:
                        grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                    if grad_w is not None:
                        gw = g.t() @ h
                        if s == 0:
                            grad_w = gw.float()
                        else:
                            grad_w += gw
                del logp
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX
    rows skipped). hidden (..., H), targets (...). Returns an fp32 scalar (a sum, not a mean:
    the trainer divides by the global target count)."""
    keep = targets != IGNORE_INDEX
    h = hidden[keep]
    tgt = targets[keep]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (DDP needs every rank to backward)
    return _LinearCrossEntropy.apply(h, weight, tgt, chunk, compute_dtype or hidden.dtype)


class _TokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[target] per row, in chunks of rows: only one
    (chunk x vocab) block of logits exists at a time, in the backward pass too (recomputed)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, temperature, compute_dtype):  # type: ignore[override]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.detach().to(compute_dtype)
            for s in range(0, hidden.shape[0], chunk):
                logits = (hidden[s : s + chunk].detach().to(compute_dtype) @ w.t()).float() / temperature
                out[s : s + chunk] = logits.log_softmax(-1).gather(1, targets[s : s + chunk, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.temperature, ctx.compute_dtype = chunk, temperature, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.detach().to(ctx.compute_dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk].detach().to(ctx.compute_dtype)
                tgt = targets[s : s + ctx.chunk]
                g = grad[s : s + ctx.chunk].float()
                p = ((h @ w.t()).float() / ctx.temperature).softmax(-1)
                # d logp[t] / d logits = onehot(t) - softmax, scaled by the upstream gradient and 1/T
                d = p.mul_(-g[:, None])
                d[torch.arange(len(tgt), device=d.device), tgt] += g
                d = (d / ctx.temperature).to(ctx.compute_dtype)
                if gh is not None:
                    gh[s : s + ctx.chunk] = (d @ w).to(hidden.dtype)
                if gw is not None:
                    gw += (d.t() @ h).float()
        return gh, (gw.to(weight.dtype) if gw is not None else None), None, None, None, None


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int = 512,
                temperature: float = 1.0, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row log-prob of `targets` (N,) under `hidden` (N, H) @ `weight` (V, H).T / temperature."""
    return _TokenLogps.apply(hidden, weight, targets, chunk, temperature, compute_dtype or hidden.dtype)


class CausalLMLoss(nn.Module):
    """The model plus its loss as one module: what DDP / FSDP2 wrap, so that the LM head's
    weight is gathered by the wrapper's forward like every other parameter.

    forward(input_ids, position_ids, document_ids, targets) -> summed loss over target tokens;
    forward(batch) does the same for a `Batch` (the trainer's objective interface).
    """

    def __init__(self, model: nn.Module, chunk: int = 1024, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.compute_dtype = compute_dtype

    def forward(
        self,
        input_ids: torch.Tensor | Batch,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(input_ids, Batch):
            b = input_ids
            input_ids, position_ids, document_ids, targets = b.input_ids, b.position_ids, b.document_ids, b.targets
        attn = DocumentAttention(document_ids)
        hidden = self.model.hidden_states(input_ids, position_ids, attn)  # (B, T, H)
        loss = linear_cross_entropy(
            hidden, self.model.lm_head.weight, targets, chunk=self.chunk, compute_dtype=self.compute_dtype
        )
        # MoE: router_aux_loss_coef x the load-balancing loss (padding excluded), added per target
        # token so that the trainer's division by the target count gives mean CE + coef x aux
        aux_fn = getattr(self.model, "router_aux_loss", None)
        aux = aux_fn(document_ids >= 0) if aux_fn is not None else None
        if aux is not None:
            loss = loss + aux * (targets != IGNORE_INDEX).sum()
        return loss
