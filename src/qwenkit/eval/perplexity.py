"""Perplexity with llama.cpp's `llama-perplexity` convention, so the numbers compare.

The text is tokenized whole as llama-perplexity does (`llama_tokenize`: control tokens such as
`<|endoftext|>` written in the text are plain text, non-special added tokens such as
`<tool_call>` are still matched; BOS only if the tokenizer adds one, Qwen's does not), cut into
`n_chunk = len(tokens) // n_ctx` non-overlapping windows (the tail is dropped; at least two
windows are required). Each window is evaluated from scratch and only its second half is
scored: logits at positions `first = n_ctx // 2` … `n_ctx - 2` predict tokens `first + 1` …
`n_ctx - 1`, i.e. `n_ctx - 1 - first` tokens per window. PPL = exp(mean NLL) over all scored
tokens; the ± is llama.cpp's: ppl * sqrt(var(NLL) / (count - 1)).

`sliding_perplexity` is the other common convention (transformers' "perplexity of fixed-length
models"), for one long text: windows of `n_ctx` tokens start every `stride` tokens and each
scores only the tokens no earlier window scored, so every token but the first is scored once,
with at least `n_ctx - stride` tokens of context once the text is longer than a window.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float  # mean negative log-likelihood (nats/token)
    n_ctx: int
    n_chunks: int
    n_scored: int
    running: list[float] = field(default_factory=list)  # cumulative PPL after each chunk
    seconds: float = 0.0
    n_evaluated: int | None = None  # tokens run through the model (default: n_chunks * n_ctx)

    @property
    def tokens_per_second(self) -> float:
        """Tokens evaluated (whole windows) per second."""
        n = self.n_chunks * self.n_ctx if self.n_evaluated is None else self.n_evaluated
        return n / self.seconds if self.seconds > 0 else 0.0

    def llama_log(self) -> str:
        """The lines llama-perplexity prints."""
        run = "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(self.running))
        return f"{run}\nFinal estimate: PPL = {self.ppl:.4f} +/- {self.ppl_stderr:.5f}"


def llama_tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids as llama.cpp's `common_tokenize(ctx, text, add_special, parse_special=false)`:
    only USER_DEFINED added tokens are matched in the text. llama.cpp's GGUF converter makes
    every special token *and* every `<|...|>`-looking one CONTROL (Qwen's FIM/repo tokens are
    not special in HF terms, yet CONTROL there), leaving `<tool_call>` / `</tool_call>`."""
    added = {
        a.content: i
        for i, a in tokenizer.added_tokens_decoder.items()
        if not a.special and not (a.content.startswith("<|") and a.content.endswith("|>"))
    }
    if not added:
        return tokenizer.encode(text, split_special_tokens=True)
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for i, part in enumerate(pattern.split(text)):
        if i % 2:
            ids.append(added[part])
        elif part:
            ids.extend(tokenizer.encode(part, split_special_tokens=True))
    return ids


def _window_logits(
    model: Any, ids: torch.Tensor, first: int, kv_cache_dtype: str | None = None, chunk_size: int = 512
) -> torch.Tensor:
    """(B, n_ctx) -> fp32 logits (B, n_ctx - 1 - first, V) at positions first … n_ctx - 2.
    `kv_cache_dtype` ("auto" / "int8"): each window runs in chunks of `chunk_size` tokens through
    the engine's paged KV cache in that dtype (attention reads K/V back from the cache, as in
    serving), instead of one forward over the whole window."""
    if kv_cache_dtype is not None:
        return torch.stack([_cached_window_logits(model, row, first, kv_cache_dtype, chunk_size) for row in ids])
    if hasattr(model, "hidden_states") and hasattr(model, "compute_logits"):
        h = model.hidden_states(ids)  # (B, T, hidden)
        return model.compute_logits(h[:, first:-1]).float()  # lm_head on the scored half only
    return model(ids)[:, first:-1].float()


def _cached_window_logits(model: Any, ids: torch.Tensor, first: int, kv_cache_dtype: str, chunk_size: int) -> torch.Tensor:
    from qwenkit.engine.kv_cache import KVCache
    from qwenkit.engine.paged_attention import single_sequence_metadata

    cfg, param = model.config, next(model.parameters())
    n, bs = ids.numel(), 16
    kv = KVCache(cfg.num_hidden_layers, -(-n // bs), bs, cfg.num_key_value_heads, cfg.head_dim, param.dtype,
                 param.device, kv_cache_dtype)  # fmt: skip
    hidden = []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        md = single_sequence_metadata(kv, s, e - s)
        hidden.append(model.hidden_states(ids[s:e], torch.arange(s, e, device=ids.device), md))
    h = torch.cat(hidden, dim=0)  # (n, hidden)
    return model.compute_logits(h[first:-1]).float()


@torch.inference_mode()
def perplexity(
    model: Any,
    token_ids: Sequence[int],
    n_ctx: int = 512,
    batch_size: int = 1,
    max_chunks: int | None = None,
    bos_token_id: int | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    kv_cache_dtype: str | None = None,
) -> PerplexityResult:
    """`bos_token_id`: replace each window's first token with BOS (llama.cpp does so when the
    vocab adds BOS). `on_chunk(i, running_ppl)` is called after each window. `kv_cache_dtype`:
    run each window through a paged KV cache of that dtype ("auto", "int8"; see `_window_logits`)."""
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be >= 4, got {n_ctx}")
    n_chunk = len(token_ids) // n_ctx
    if n_chunk < 2:
        raise ValueError(f"need at least 2*n_ctx = {2 * n_ctx} tokens, the text has {len(token_ids)}")
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    device = next(model.parameters()).device
    tokens = torch.tensor(list(token_ids[: n_chunk * n_ctx]), dtype=torch.long, device=device)
    windows = tokens.view(n_chunk, n_ctx)  # (n_chunk, n_ctx)
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    for b in range(0, n_chunk, batch_size):
        ids = windows[b : b + batch_size].clone()  # (B, n_ctx)
        if bos_token_id is not None:
            ids[:, 0] = bos_token_id
        logprobs = torch.log_softmax(_window_logits(model, ids, first, kv_cache_dtype), dim=-1)  # (B, S, V)
        targets = windows[b : b + batch_size, first + 1 :]  # (B, S)
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()  # (B, S)
        for row in nll:
            nll_sum += float(row.sum())
            nll2_sum += float((row * row).sum())
            count += row.numel()
            running.append(math.exp(nll_sum / count))
            if on_chunk is not None:
                on_chunk(len(running) - 1, running[-1])
    seconds = time.perf_counter() - t0
    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 else float("nan")
    return PerplexityResult(ppl, stderr, mean, n_ctx, n_chunk, count, running, seconds)


@torch.inference_mode()
def sliding_perplexity(
    model: Any,
    token_ids: Sequence[int],
    n_ctx: int,
    stride: int,
    on_chunk: Callable[[int, float], None] | None = None,
    kv_cache_dtype: str | None = None,
) -> PerplexityResult:
    """Strided sliding-window perplexity of one text (see the module docstring); `kv_cache_dtype`
    as in `perplexity`."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
    if not 1 <= stride < n_ctx:  # each window needs one token of context before its first target
        raise ValueError(f"stride must be in [1, n_ctx={n_ctx}), got {stride}")
    n = len(token_ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens, the text has {n}")
    device = next(model.parameters()).device
    tokens = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    prev_end = 1  # token 0 has no context: never scored
    evaluated = 0
    t0 = time.perf_counter()
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        if end <= prev_end:
            break
        ids = tokens[None, begin:end]  # (1, L)
        evaluated += end - begin
        first = prev_end - 1 - begin  # window index of the logit that predicts token prev_end
        logits = _window_logits(model, ids, first, kv_cache_dtype)[0]  # (end - prev_end, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = -logprobs.gather(-1, tokens[prev_end:end, None]).squeeze(-1).double()
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.numel()
        running.append(math.exp(nll_sum / count))
        if on_chunk is not None:
            on_chunk(len(running) - 1, running[-1])
        prev_end = end
        if end == n:
            break
    seconds = time.perf_counter() - t0
    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, stderr, mean, n_ctx, len(running), count, running, seconds, evaluated)
