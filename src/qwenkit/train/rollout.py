"""GRPO rollouts from qwenkit's engine, in the training process, on the module being trained.

The engine runs the plain module as it is (`install_cpu_runtime=False`: no fused CPU modules are
swapped in, no weights are copied), so the rollouts see the current weights, and peft LoRA layers
injected into the module are live. After each optimizer step `refresh()` drops the engine's
prefix cache (its KV came from the old weights). With `quantization="int8"` the engine runs a
quantized view of the module (`qwenkit.quant.quality.quantized_view`: linears int8, every other
tensor shared), rebuilt from the trained weights by `refresh()` after each step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.outputs import RequestOutputKind
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """G completions for each prompt, grouped: completion k of prompt i is row i * G + k."""

    prompt_ids: list[list[int]]  # one per completion
    completion_ids: list[list[int]]
    sampling_logps: list[list[float]]  # the engine's log-probs of the sampled tokens (temperature 1)
    texts: list[str]
    finish_reasons: list[str]
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Rollouts:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        num_generations: int,
        max_completion_length: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        quantization: str = "none",
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.quantization = quantization
        self.params = SamplingParams(
            n=num_generations, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
            max_tokens=max_completion_length, logprobs=0,
        )
        self.engine_args = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs, install_cpu_runtime=False,
                                kv_cache_memory=_kv_bytes(model, max_num_seqs, max_model_len))
        self.generator = torch.Generator().manual_seed(seed)
        self.requantize_s = 0.0
        self.engine = self._build()
        self._count = 0

    def _build(self) -> LLMEngine:
        module = self.model
        if self.quantization != "none":
            from qwenkit.quant.quality import quantized_view

            t0 = time.perf_counter()
            with torch.no_grad():
                module = quantized_view(self.model, self.quantization)
            self.requantize_s = time.perf_counter() - t0
        return LLMEngine(module, self.tokenizer, **self.engine_args)

    def refresh(self) -> None:
        """After an optimizer step: the next rollouts sample from the new weights."""
        if self.quantization != "none":
            self.engine = self._build()  # a re-quantization from the trained weights
        elif not self.engine.reset_prefix_cache():
            raise RuntimeError("the engine still runs requests: cannot reset its prefix cache")

    def generate(self, prompts: list[list[int]]) -> RolloutBatch:
        """G completions for each prompt (token ids), in eval mode and without autograd."""
        was_training = self.model.training
        self.model.eval()
        engine = self.engine
        t0 = time.perf_counter()
        ids = []
        try:
            with torch.no_grad():
                for p in prompts:
                    rid = f"rollout-{self._count}"
                    self._count += 1
                    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
                    params = self.params.clone() if hasattr(self.params, "clone") else self.params
                    params = _with_seed(params, seed)
                    engine.add_request(rid, {"prompt_token_ids": p}, params, output_kind=RequestOutputKind.FINAL_ONLY)
                    ids.append(rid)
                done: dict[str, Any] = {}
                while len(done) < len(ids):
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                    if len(done) < len(ids) and not engine.has_unfinished_requests():
                        raise RuntimeError("engine finished without returning every rollout")
        except BaseException:
            engine.abort_request([r for r in ids])
            raise
        finally:
            self.model.train(was_training)
        dt = time.perf_counter() - t0
        batch = RolloutBatch([], [], [], [], [], seconds=dt)
        for p, rid in zip(prompts, ids):
            for c in done[rid].outputs:
                batch.prompt_ids.append(list(p))
                batch.completion_ids.append(list(c.token_ids))
                batch.sampling_logps.append(
                    [float(lp[t].logprob) if lp and t in lp else math.nan for t, lp in zip(c.token_ids, c.logprobs or [])]
                )
                batch.texts.append(c.text)
                batch.finish_reasons.append(str(c.finish_reason))
        n = sum(len(c) for c in batch.completion_ids)
        batch.tokens_per_s = n / dt if dt > 0 else 0.0
        return batch


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def _kv_bytes(model: nn.Module, seqs: int, length: int) -> int:
    """KV cache for `seqs` sequences of `length` tokens (fp32), plus a few blocks of slack."""
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    return per_token * (seqs * (length + 32) + 64)
