"""Batch invariance: a seeded request gives the same tokens and bit-identical logprobs run alone,
after its prompt is in the prefix cache, among 16 other requests, with chunked prefill, when
preempted and recomputed, and with another thread count.

This holds on the CPU path with qwenkit's C kernels: int8 / int4 linears (the int8-activation
GEMMs compute each row alike at every M) and `ops.paged_attention` (one kernel for every query
row). fp32 linears run torch's GEMM, whose rounding depends on the row count (M=1, 2-3 and >= 4
differ), so the fp32 model is tested with its linears computed one row at a time: that checks
everything else (attention, norms, RoPE, the sampler) is batch-invariant.
"""
from __future__ import annotations

import random
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.cpu import ops
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.quant import quantize_model
from qwenkit.sampling_params import SamplingParams
from tests.engine_helpers import run_engine
from tests.tiny import tiny_hf_config

pytestmark = pytest.mark.skipif(ops._lib() is None, reason="no C compiler / AVX2: C kernels not built")

# head_dim 64: the C attention kernel's size (ops.ATTN_HEAD_DIMS)
DIMS = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
MAX_TOKENS = 12


def _rowwise_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = torch.cat([F.linear(rows[i : i + 1], self.weight, self.bias) for i in range(rows.shape[0])])
    return y.view(*x.shape[:-1], -1)


def _tiny(variant: str) -> Qwen2ForCausalLM:
    cfg = ModelConfig.from_hf(tiny_hf_config(**DIMS))
    assert cfg.head_dim in ops.ATTN_HEAD_DIMS
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05)
            if "norm" in name:
                p.add_(1.0)
    if variant == "fp32-rowwise":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.forward = types.MethodType(_rowwise_linear, m)
    else:
        # small_m=4: decode steps of up to 4 rows run the fused C decode step, larger ones the
        # per-module path, and the linears switch between their small-M and large-M entries
        quantize_model(model, variant, small_m=4)
    return model


@pytest.fixture(scope="module", params=["int8", "int4-g32", "fp32-rowwise"])
def model(request: pytest.FixtureRequest) -> Qwen2ForCausalLM:
    return _tiny(request.param)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]


def _target_params() -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_TOKENS, logprobs=3, ignore_eos=True)


def _others(n: int = 16) -> tuple[list[list[int]], list[SamplingParams]]:
    """Requests of different lengths and sampling settings to share the batch with."""
    rng = random.Random(7)
    prompts = [_prompt(rng.randint(1, 120), 100 + i) for i in range(n)]
    params = [
        SamplingParams(
            temperature=[0.0, 1.0, 0.7][i % 3], seed=None if i % 2 else i, max_tokens=rng.randint(1, 20),
            logprobs=i % 4 or None, ignore_eos=True,
        )  # fmt: skip
        for i in range(n)
    ]
    return prompts, params


def _result(out) -> tuple[list[int], list[list[tuple[int, float, int | None]]]]:
    """Token ids and every reported logprob (sampled token and top 3) as exact floats."""
    c = out.outputs[0]
    lps = [[(t, lp.logprob, lp.rank) for t, lp in entry.items()] for entry in c.logprobs]
    return list(c.token_ids), lps


def _engine(model: nn.Module, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "16MiB")
    return LLMEngine(model, None, **kw)


# 33 = two blocks + 1: a prefix-cache hit leaves one token (a decode-shaped step); 45 leaves 13
@pytest.mark.parametrize("prompt_len", [33, 45])
def test_same_request_same_bits_whatever_else_runs(model: Qwen2ForCausalLM, prompt_len: int) -> None:
    prompt, params = _prompt(prompt_len, prompt_len), _target_params()

    # (a) alone, cold
    engine = _engine(model)
    [alone] = run_engine(engine, [prompt], params)
    assert alone.num_cached_tokens == 0
    want = _result(alone)
    assert len(want[0]) == MAX_TOKENS

    # (b) again: the prompt's full blocks come from the prefix cache
    [cached] = run_engine(engine, [prompt], params)
    assert cached.num_cached_tokens == prompt_len // 16 * 16
    assert _result(cached) == want

    # (c) among 16 other requests of different lengths, arriving 3 per step (the target joins
    # while others decode: mixed prefill + decode steps of changing size)
    others, other_params = _others()
    prompts = others[:8] + [prompt] + others[8:]
    plist = other_params[:8] + [params] + other_params[8:]
    outs = run_engine(_engine(model), prompts, plist, stagger=3)
    assert _result(outs[8]) == want

    # (d) chunked prefill: at most 7 tokens a step, no prefix caching
    engine = _engine(model, max_num_batched_tokens=7, max_num_seqs=4, enable_prefix_caching=False)
    [chunked] = run_engine(engine, [prompt], params)
    assert _result(chunked) == want

    # (e) all of it at once: small steps, a batch, and a cache so small that sequences are
    # preempted and recomputed
    engine = _engine(
        model, max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory=24 * 32 * 1024, enable_prefix_caching=True
    )
    outs = run_engine(engine, prompts, plist, stagger=2)
    assert engine.scheduler.num_preemptions > 0
    assert _result(outs[8]) == want

    # (f) another thread count (every kernel computes a row / row-head in one thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 3)
    try:
        [other_threads] = run_engine(_engine(model), [prompt], params)
    finally:
        torch.set_num_threads(threads)
    assert _result(other_threads) == want


@pytest.mark.slow
def test_real_05b_default_quantization_same_bits(gguf_05b_path) -> None:
    """The 0.5B with the CLI/server default runtime (quantization "auto"), the server's
    default sampling settings at temperature 1 with a seed: 16 tokens, bit-identical."""
    import dataclasses

    from qwenkit.loaders.load import load

    loaded = load(gguf_05b_path, quantization="auto", progress=False)
    tok = loaded.tokenizer

    def chat(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)

    def engine(**kw) -> LLMEngine:
        return LLMEngine(
            loaded.model, tok, generation_defaults=loaded.generation_defaults, kv_cache_memory="64MiB", **kw
        )

    base = engine().default_sampling_params()
    params = dataclasses.replace(base, temperature=1.0, seed=1234, max_tokens=16, logprobs=1, ignore_eos=True)
    prompt = chat("Name an animal.")

    eng = engine()
    [alone] = run_engine(eng, [prompt], params)
    want = _result(alone)
    [cached] = run_engine(eng, [prompt], params)
    assert cached.num_cached_tokens > 0
    assert _result(cached) == want

    texts = [
        "Name a bird.", "def fibonacci(n):", "Write a haiku about the sea.", "What is 17 * 23?",
        "Explain recursion in one sentence.", "import numpy as np", "Translate 'hello' to French.",
        "List three prime numbers.", "用中文介绍一下你自己。", "Write a SQL query that counts rows.",
        "What is the capital of France?", "Reverse a string in Rust.", "Say hi.",
        "Describe a binary search tree and its operations in a short paragraph.", "2+2=", "Why is the sky blue?",
    ]  # fmt: skip
    others = [chat(t) for t in texts]
    other_params = [dataclasses.replace(base, max_tokens=4 + i % 8, seed=i) for i in range(len(others))]
    prompts, plist = others[:8] + [prompt] + others[8:], other_params[:8] + [params] + other_params[8:]
    outs = run_engine(engine(), prompts, plist, stagger=4)
    assert _result(outs[8]) == want

    chunking = engine(max_num_batched_tokens=16, max_num_seqs=16, enable_prefix_caching=False)
    [chunked] = run_engine(chunking, [prompt], params)
    assert _result(chunked) == want
