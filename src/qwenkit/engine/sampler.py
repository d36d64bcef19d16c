"""Batched sampling over one engine step.

Order of operations (vLLM's): logits processors (`process`: logit_bias, allowed_token_ids,
bad_words, min_tokens) -> penalties -> temperature -> top-k -> top-p -> min-p -> sample. Greedy
rows (temperature 0) take the argmax of the processed, penalised logits.
Log-probabilities are reported from the *raw* distribution: log_softmax of the logits this
sampler receives, before processors, penalties and temperature (vLLM's default
`logprobs_mode="raw_logprobs"`). The model runner applies structured-output grammar masks before
calling the sampler, as vLLM's does, so those (and only those) show in the log-probs.

Seeded rows sample with their own `torch.Generator` via the exponential-race trick
(argmax p_i / E_i, E_i ~ Exp(1)), so a seeded request draws the same noise whatever else shares
the batch. Unseeded rows share one batch-wide draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qwenkit.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) long
    logprobs: torch.Tensor | None = None  # (B,) logprob of each sampled token
    top_token_ids: torch.Tensor | None = None  # (B, K)
    top_logprobs: torch.Tensor | None = None  # (B, K)


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """logits (B, V) -> penalised logits. presence/frequency/repetition: (B,)."""
    b, v = logits.shape
    out_counts = torch.zeros(b, v + 1, dtype=logits.dtype, device=logits.device)
    out_tok = _pad(output_ids, v).to(logits.device)  # (B, L), pad -> column v (dropped)
    out_counts.scatter_add_(1, out_tok, torch.ones_like(out_tok, dtype=logits.dtype))
    out_counts = out_counts[:, :v]  # (B, V)
    if bool((repetition != 1.0).any()):
        seen = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, _pad(prompt_ids, v).to(logits.device), True)
        seen = seen[:, :v] | (out_counts > 0)
        rep = repetition[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * out_counts
    logits = logits - presence[:, None] * (out_counts > 0).to(logits.dtype)
    return logits


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k / top-p / min-p. logits (B, V) already temperature-scaled.

    top_k: (B,) long with V meaning disabled; top_p: (B,) with 1 disabled; min_p: (B,) with 0
    disabled. Rows are filtered in groups of equal top-k (only the top k candidates are sorted),
    and top-p / min-p act only on the rows that ask for them, so a row's result never depends
    on what else is in the batch (seeded requests reproduce in any batch).
    """
    v = logits.shape[1]
    active = (top_k < v) | (top_p < 1.0) | (min_p > 0)
    if not bool(active.any()):
        return logits  # no filter in this batch: skip the sort
    out = logits.clone()
    for k in top_k[active].unique().tolist():
        rows = (active & (top_k == k)).nonzero().squeeze(1)
        out[rows] = _filter_rows(logits[rows], int(k), top_p[rows], min_p[rows])
    return out


def _filter_rows(logits: torch.Tensor, k: int, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`filter_logits` for rows (R, V) that share one top-k value."""
    if k < logits.shape[1]:
        vals, idx = logits.topk(k, dim=-1)  # (R, K), sorted descending
    else:
        vals, idx = logits.sort(dim=-1, descending=True, stable=True)  # (R, V)
    probs = vals.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop |= probs < (min_p[:, None] * probs[:, :1])
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(1, idx, vals.masked_fill(drop, float("-inf")))


class Sampler:
    """Samples one token per row of a (B, V) logits tensor under per-row SamplingParams."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        forbidden_token_ids: list[list[int]] | None = None,
        *,
        process: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """`forbidden_token_ids[i]` are masked for row i; `process` maps the fp32 (B, V) logits
        to processed ones after the raw log-probs are taken (the engine's logits processors)."""
        dist = self.distribution(logits, params, prompt_ids, output_ids, forbidden_token_ids, process=process)
        token_ids = dist.greedy_ids
        if dist.probs is not None:
            probs = dist.probs
            b, v = probs.shape
            dev = probs.device
            noise = torch.empty_like(probs)
            unseeded = [i for i, g in enumerate(generators) if g is None]
            if unseeded:
                noise[unseeded] = torch.empty(len(unseeded), v, device=dev).exponential_()
            for i, g in enumerate(generators):
                if g is not None:
                    noise[i] = torch.empty(v, device=dev).exponential_(generator=g)
            sampled = (probs / noise).argmax(dim=-1)
            token_ids = torch.where(dist.greedy, token_ids, sampled)
        return dist.output(token_ids, params)

    def distribution(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        forbidden_token_ids: list[list[int]] | None = None,
        *,
        process: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Distribution:
        """Everything up to the draw: the greedy choice of each row and, when some row samples,
        the (B, V) distribution it samples from (speculative decoding verifies drafts on it)."""
        logits = logits.float()
        b, v = logits.shape
        dev = logits.device
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        if process is not None:
            logits = process(logits)

        presence = torch.tensor([p.presence_penalty for p in params], device=dev)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)
        repetition = torch.tensor([p.repetition_penalty for p in params], device=dev)
        if bool((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any()):
            logits = apply_penalties(logits, prompt_ids, output_ids, presence, frequency, repetition)
        if forbidden_token_ids and any(forbidden_token_ids):
            rows = [i for i, f in enumerate(forbidden_token_ids) for _ in f]
            cols = [t for f in forbidden_token_ids for t in f]
            logits = logits.index_put((torch.tensor(rows), torch.tensor(cols)), torch.tensor(float("-inf")))

        greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
        probs = None
        if not bool(greedy.all()):
            temp = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
            top_k = torch.tensor([p.top_k if p.top_k > 0 else v for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            scaled = filter_logits(logits / temp[:, None], top_k.clamp(max=v), top_p, min_p)
            probs = scaled.softmax(dim=-1)  # (B, V)
        return Distribution(logits.argmax(dim=-1), greedy, probs, raw_logprobs)


@dataclass
class Distribution:
    """One step's rows before the draw (see `Sampler.distribution`)."""

    greedy_ids: torch.Tensor  # (B,) argmax of the processed, penalised logits
    greedy: torch.Tensor  # (B,) bool: the row is greedy (temperature 0)
    probs: torch.Tensor | None  # (B, V) sampling distribution; None when every row is greedy
    raw_logprobs: torch.Tensor | None  # (B, V) when some row wants log-probs

    def output(self, token_ids: torch.Tensor, params: list[SamplingParams]) -> SamplerOutput:
        """The chosen tokens with their raw log-probs (and the top-k alternatives)."""
        out = SamplerOutput(token_ids=token_ids)
        if self.raw_logprobs is not None:
            out.logprobs = self.raw_logprobs.gather(1, token_ids[:, None])[:, 0]
            k = max(p.logprobs or 0 for p in params)
            if k > 0:
                out.top_logprobs, out.top_token_ids = self.raw_logprobs.topk(k, dim=-1)
        return out
