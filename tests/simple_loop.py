"""The simple single-sequence generation loop (contiguous KV cache, no batching): the test
oracle the engine is checked against for tokens, streaming and stop semantics. qwenkit itself
generates only through the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from qwenkit.engine.contiguous_cache import ContiguousKVCache
from qwenkit.engine.sampler import Sampler
from qwenkit.engine.stop import find_stop, stop_holdback
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.sampling_params import SamplingParams
from qwenkit.tokenizer import IncrementalDetokenizer


@dataclass
class GenerationEvent:
    """One streamed step: `delta` text (may be empty), the new token, and the final state."""

    delta: str
    token_id: int | None
    finished: bool = False
    finish_reason: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def generate_stream(
    model: Qwen2ForCausalLM,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...] | list[int] = (),
    max_model_len: int | None = None,
) -> Iterator[GenerationEvent]:
    """Greedy/sampled generation of one sequence, yielding text deltas as they become final.

    Stops at an EOS id (unless `ignore_eos`), a stop token id, a stop string (excluded from the
    text) or `max_tokens`. Closing the generator mid-stream simply stops the computation.
    """
    cfg = model.config
    if not prompt_ids:
        raise ValueError("prompt is empty: at least one token is required")
    limit = max_model_len or cfg.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {limit}")
    max_new = min(params.max_tokens or limit, limit - len(prompt_ids))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(
        cfg.num_hidden_layers,
        1,
        len(prompt_ids) + max_new,
        cfg.num_key_value_heads,
        cfg.head_dim,
        dtype=dtype,
        device=device,
    )
    sampler = Sampler()
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
    holdback = stop_holdback(params.stop)

    out_ids: list[int] = []
    text = ""  # all detokenized text so far
    emitted = 0  # chars of `text` already yielded
    ids = torch.tensor([prompt_ids], device=device)
    pos = torch.arange(len(prompt_ids), device=device)[None]
    finish_reason = "length"
    stop_str_hit = False
    t_start = time.perf_counter()
    while True:
        cache.begin(ids.shape[1])
        logits = model(ids, pos, cache)[:, -1]  # (1, V)
        forbid = [sorted(stop_ids)] if len(out_ids) < params.min_tokens else None
        token = int(sampler(logits, [params], [prompt_ids], [out_ids], [gen], forbid).token_ids[0])
        out_ids.append(token)
        if token in stop_ids:
            finish_reason = "stop"
            break
        text += detok.add(token)
        hit = find_stop(text, params.stop, max(0, emitted - holdback)) if params.stop else None
        if hit is not None:
            text = text[: hit[0]] + (hit[1] if params.include_stop_str_in_output else "")
            finish_reason = "stop"
            stop_str_hit = True
            break
        if len(out_ids) >= max_new:
            break
        safe = len(text) - holdback
        if safe > emitted:
            yield GenerationEvent(delta=text[emitted:safe], token_id=token)
            emitted = safe
        else:
            yield GenerationEvent(delta="", token_id=token)
        ids = torch.tensor([[token]], device=device)
        pos = torch.tensor([[len(prompt_ids) + len(out_ids) - 1]], device=device)
    if not stop_str_hit:
        text += detok.flush()
    elapsed = time.perf_counter() - t_start
    yield GenerationEvent(
        delta=text[emitted:],
        token_id=out_ids[-1] if out_ids else None,
        finished=True,
        finish_reason=finish_reason,
        text=text,
        token_ids=out_ids,
        usage={
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(out_ids),
            "total_tokens": len(prompt_ids) + len(out_ids),
            "seconds": round(elapsed, 3),
        },
    )


def generate(
    model: Qwen2ForCausalLM,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...] | list[int] = (),
) -> GenerationEvent:
    """Run `generate_stream` to the end and return its final event."""
    last = None
    for last in generate_stream(model, tokenizer, prompt_ids, params, eos_token_ids):
        pass
    assert last is not None and last.finished
    return last
