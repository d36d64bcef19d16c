"""Shared pieces of the engine tests: a tiny model with confident greedy choices, the naive
full-recompute reference, and a loop that drives an `LLMEngine` to completion."""
from __future__ import annotations

import functools
import random
from typing import Any, Callable

import torch

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.outputs import RequestOutput
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.sampling_params import SamplingParams
from tests.tiny import make_hf_and_ours

# Random tiny models have near-uniform logits; a 10x lm_head separates the argmax so that the
# engine's different (but equivalent) float summation orders cannot flip a greedy choice.
LM_HEAD_SCALE = 10.0


@functools.lru_cache(maxsize=8)
def _tiny_model(seed: int, overrides: tuple[tuple[str, Any], ...]) -> Qwen2ForCausalLM:
    _, model = make_hf_and_ours(seed=seed, **dict(overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def tiny_model(seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    return _tiny_model(seed, tuple(sorted(overrides.items())))


def random_prompts(
    n: int, min_len: int = 1, max_len: int = 60, vocab: int = 256, seed: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


@torch.inference_mode()
def naive_greedy(
    model: torch.nn.Module,
    prompt: list[int],
    max_tokens: int,
    attn_metadata_fn: Callable[[int], Any] | None = None,
) -> list[int]:
    """The oracle: recompute the whole sequence with the plain model for every new token."""
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        meta = attn_metadata_fn(len(ids)) if attn_metadata_fn else None
        logits = model(torch.tensor(ids), torch.arange(len(ids)), meta)  # (T, V)
        token = int(logits[-1].argmax())
        ids.append(token)
        out.append(token)
    return out


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_engine(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    stagger: int = 0,
    priorities: list[int] | None = None,
    on_step: Callable[[LLMEngine, int], None] | None = None,
) -> list[RequestOutput]:
    """Submit all prompts at once (stagger=0) or `stagger` per step; return final outputs in
    input order (ids are the prompt indices)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    pending = list(range(len(prompts)))
    finals: dict[str, RequestOutput] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(stagger or len(pending)):
            if pending:
                i = pending.pop(0)
                engine.add_request(str(i), prompts[i], plist[i], priority=priorities[i] if priorities else 0)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if on_step is not None:
            on_step(engine, step)
        step += 1
    return [finals[str(i)] for i in range(len(prompts))]


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def prompt_logprob_values(output: RequestOutput) -> list[float]:
    """The log-prob of each prompt token after the first (requests made with prompt_logprobs=0)."""
    return [next(iter(d.values())).logprob for d in output.prompt_logprobs[1:]]
