"""int8 KV cache (`kv_cache_dtype="int8"`): K and V stored as int8 with one fp32 scale per token
and KV head (absmax / 127 over head_dim).

The oracle is transformers' Qwen2 on the same weights with an attention function registered in
this file that rounds K and V to int8 per token and head (its own few lines of torch, not
qwenkit's quantizer) before eager attention: what an int8 cache holds, recomputed from scratch
at every position. Our engine must match it within fp32 summation noise (plus the rare
element that lands on the other side of a rounding boundary), through the torch attention path
and through the C kernels (which fold the scales into q.k and the softmax weights instead of
dequantizing), while differing from the fp32 cache by much more than that.
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from qwenkit import cpu
from qwenkit.config import ModelConfig
from qwenkit.cpu import build, decode_step, ops
from qwenkit.engine.kv_cache import KVCache, dequantize_kv, quantize_kv
from qwenkit.engine.llm import LLM
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.paged_attention import single_sequence_metadata
from qwenkit.quant import quantize_model
from qwenkit.sampling_params import SamplingParams
from tests.engine_helpers import greedy, random_prompts, run_engine, token_ids, prompt_logprob_values
from tests.tiny import make_hf_and_ours, tiny_hf_config
from tests.serve_utils import wait_ready

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# head_dim 64: the C attention kernel's size (D = hidden / heads)
TINY = dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
LM_HEAD_SCALE = 10.0  # confident greedy choices (see tests/engine_helpers.py)
PROMPT_LEN, DECODE_STEPS, CHUNK = 27, 20, 10
# Logits (|logit| up to ~25 with the 10x head), max abs difference over all 47 positions.
# int8 engine vs the int8 oracle: fp32 summation order alone gives ~1e-5 (measured 2e-5 torch
# path); the C kernel's exp polynomial, its folded scales and an element whose K/V lands on the
# neighbouring code (its value within float noise of a half step) add more (measured 6e-4).
INT8_VS_ORACLE_ATOL = 5e-3
# int8 vs fp32 cache: each K/V element moves by up to absmax/254 (measured max 0.088): the check
# above only proves anything if this gap is well above its tolerance.
MIN_INT8_VS_FP32_GAP = 5 * INT8_VS_ORACLE_ATOL


def _ref_quant(x: torch.Tensor) -> torch.Tensor:
    """Round x to int8 codes per row of the last dim and back (the oracle's own quantizer)."""
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    step = torch.where(step == 0, torch.ones_like(step), step)
    return (x / step).round().clamp(-127, 127) * step


def _int8_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-interface signature: query (B, Hq, T, D), key / value (B, Hkv, T, D)
    after RoPE. Causal softmax attention over int8-rounded K/V, written out (transformers passes
    no mask to a custom function)."""
    k, v = _ref_quant(key), _ref_quant(value)
    rep = query.shape[1] // key.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling  # (B, Hq, T, T)
    t = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2), None


@pytest.fixture(scope="module")
def models():
    """(transformers oracle with int8 K/V, transformers with fp32 K/V, ours): same weights."""
    from transformers import AttentionInterface

    AttentionInterface.register("qwenkit_test_int8_kv", _int8_kv_attention)
    ref, ours = make_hf_and_ours(seed=11, **TINY)
    with torch.no_grad():
        ref.lm_head.weight.mul_(LM_HEAD_SCALE)
        ours.lm_head.weight.mul_(LM_HEAD_SCALE)
    import copy

    ref_fp32 = copy.deepcopy(ref)
    ref.set_attn_implementation("qwenkit_test_int8_kv")
    return ref, ref_fp32, ours


def test_quantize_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 64, generator=g) * torch.logspace(-4, 3, 64)[:, None, None]  # rows of very different sizes
    x[3, 1] = 0.0  # an all-zero head
    x[5, 0, 7] = 1e4  # an outlier dominates its row's scale
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    err = (dequantize_kv(codes, scale, torch.float32) - x).abs()
    bound = x.abs().amax(-1, keepdim=True) / 254
    assert bool((err <= bound * (1 + 1e-5)).all()), float((err / bound.clamp(min=1e-30)).max())
    assert float((err / bound.clamp(min=1e-30)).max()) > 0.9  # the bound is tight (some element is half a step off)
    assert torch.equal(dequantize_kv(codes[3, 1], scale[3, 1], torch.float32), torch.zeros(64))
    assert int(codes.abs().max()) == 127 and int(codes[5, 0, 7]) == 127


def test_capacity_for_a_fixed_budget():
    cfg = ModelConfig.from_hf(tiny_hf_config(**TINY))  # 4 layers, 2 KV heads, head_dim 64
    budget, bs = 3 * 2**20, 16
    fp32 = KVCache.from_memory_budget(cfg, bs, budget, torch.float32, torch.device("cpu"))
    int8 = KVCache.from_memory_budget(cfg, bs, budget, torch.float32, torch.device("cpu"), kv_cache_dtype="int8")
    bf16 = KVCache.from_memory_budget(cfg, bs, budget, torch.bfloat16, torch.device("cpu"))
    heads = 2 * 4 * 2  # (K, V) x layers x KV heads
    assert fp32.num_blocks == budget // (heads * 64 * 4 * bs)
    assert bf16.num_blocks == budget // (heads * 64 * 2 * bs)
    assert int8.num_blocks == budget // (heads * (64 + 4) * bs)  # codes + one fp32 scale per token-head
    assert int8.num_blocks / fp32.num_blocks == pytest.approx(4 * 64 / 68, rel=0.01)  # 3.76x
    assert int8.num_blocks / bf16.num_blocks == pytest.approx(2 * 64 / 68, rel=0.01)  # 1.88x
    assert fp32.nbytes <= budget and int8.nbytes <= budget and int8.nbytes > budget - heads * 68 * bs
    assert int8.k_cache[0].dtype == torch.int8 and int8.k_scale[0].shape == (int8.num_blocks, bs, 2)


@pytest.mark.parametrize("value", ["fp8", "fp8_e5m2", "int4", "float16"])
def test_unsupported_cache_dtypes_are_clear_errors(value: str):
    msg = "use int8" if value.startswith("fp8") else "kv_cache_dtype must be one of"
    with pytest.raises(ValueError, match=msg):
        LLMEngine(make_hf_and_ours(seed=0)[1], None, kv_cache_dtype=value)


def _our_logits(model, ids: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """Prefill in CHUNK-token chunks, then DECODE_STEPS single-token steps (teacher-forced on
    `ids`) through one paged cache; logits of every position (T, V)."""
    cfg = model.config
    kv = KVCache(cfg.num_hidden_layers, 8, 8, cfg.num_key_value_heads, cfg.head_dim, kv_cache_dtype=kv_cache_dtype)
    steps = [(s, min(s + CHUNK, PROMPT_LEN)) for s in range(0, PROMPT_LEN, CHUNK)]
    steps += [(p, p + 1) for p in range(PROMPT_LEN, len(ids))]
    out = []
    with torch.inference_mode():
        for s, e in steps:
            md = single_sequence_metadata(kv, s, e - s)
            out.append(model(torch.tensor(ids[s:e]), torch.arange(s, e), md))
    return torch.cat(out)


@pytest.mark.parametrize("path", ["torch", "c"])
def test_logits_match_the_int8_oracle(models, path: str, monkeypatch: pytest.MonkeyPatch):
    """Prefill (3 chunks) + 20 decode steps: int8 cache == transformers with int8-rounded K/V."""
    ref, ref_fp32, ours = models
    if path == "c":
        if build.lib() is None:
            pytest.skip("the C kernels need gcc and a CPU with AVX2 + FMA + F16C")
        calls = []
        real = ops.paged_attention
        monkeypatch.setattr(ops, "paged_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    else:
        monkeypatch.setattr(ops, "enabled", lambda *a: False)  # every C op off: torch attention
    ids = random_prompts(1, PROMPT_LEN + DECODE_STEPS, PROMPT_LEN + DECODE_STEPS, seed=4)[0]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
        want_fp32 = ref_fp32(torch.tensor([ids])).logits[0]
    got = _our_logits(ours, ids, "int8")
    if path == "c":  # every layer of every step read the int8 pool in C
        n_steps = -(-PROMPT_LEN // CHUNK) + DECODE_STEPS
        assert len(calls) == n_steps * ours.config.num_hidden_layers
        assert all(k["k_scale"] is not None and k["k_scale"].dtype == torch.float32 for k in calls)
    got_fp32 = _our_logits(ours, ids, "auto")
    err = float((got - want).abs().max())
    gap = float((got - want_fp32).abs().max())
    assert err <= INT8_VS_ORACLE_ATOL, err
    assert gap >= MIN_INT8_VS_FP32_GAP, gap  # int8 is really in use (and visible at this tolerance)
    assert float((got_fp32 - want_fp32).abs().max()) <= 1e-3  # the fp32 cache still equals plain attention
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_greedy_tokens_equal_the_int8_oracle(models):
    """LLM(kv_cache_dtype="int8"), batched requests with chunked prefill, block size 4: greedy
    tokens == the oracle's naive full-recompute loop."""
    ref, _, ours = models
    prompts = random_prompts(4, 3, 30, seed=7)
    outs = LLM(ours, kv_cache_dtype="int8", block_size=4, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=96,
               install_cpu_runtime=False).generate([{"prompt_token_ids": p} for p in prompts], greedy(12))  # fmt: skip
    for p, out in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(p):]


def test_fused_decode_step_is_bit_identical_with_int8_cache(monkeypatch: pytest.MonkeyPatch):
    """The one-call C decode step quantizes new K/V itself (csrc/decode_step.c) and reads the
    int8 pool in place: the same tokens and log-probs, bit for bit, as the per-module path
    (torch quantizer + C paged attention) through the engine."""
    if build.lib() is None:
        pytest.skip("the C kernels need gcc and a CPU with AVX2 + FMA + F16C")
    _, ours = make_hf_and_ours(seed=5, **TINY)
    model = cpu.install(quantize_model(ours, "int8"))
    prompts = random_prompts(6, 1, 23, seed=2)

    def run() -> list:
        engine = LLMEngine(model, None, max_num_seqs=4, block_size=4, max_model_len=64, kv_cache_dtype="int8")
        return run_engine(engine, prompts, greedy(12, logprobs=2), stagger=2)

    ran = []
    real = decode_step.run
    monkeypatch.setattr(decode_step, "run", lambda *a, **k: (lambda o: ran.append(o is not None) or o)(real(*a, **k)))
    fused = run()
    assert sum(ran) > 10
    monkeypatch.setattr(decode_step, "run", lambda *a, **k: None)
    plain = run()
    assert token_ids(fused) == token_ids(plain)
    assert [o.outputs[0].logprobs for o in fused] == [o.outputs[0].logprobs for o in plain]


def test_prefix_cache_hits_on_int8_blocks(models):
    _, _, ours = models
    shared = random_prompts(1, 40, 40, seed=9)[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    llm = LLM(ours, kv_cache_dtype="int8", block_size=8, max_model_len=96)
    llm.generate([{"prompt_token_ids": a}], greedy(6))
    hit = llm.generate([{"prompt_token_ids": b}], greedy(10, logprobs=1))[0]
    assert hit.num_cached_tokens == 40  # five full int8 blocks reused (codes and scales)
    fresh = LLM(ours, kv_cache_dtype="int8", block_size=8, max_model_len=96, enable_prefix_caching=False)
    cold = fresh.generate([{"prompt_token_ids": b}], greedy(10, logprobs=1))[0]
    assert cold.num_cached_tokens == 0
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids
    lp_hit = [next(iter(d.values())).logprob for d in hit.outputs[0].logprobs]
    lp_cold = [next(iter(d.values())).logprob for d in cold.outputs[0].logprobs]
    assert max(abs(x - y) for x, y in zip(lp_hit, lp_cold)) <= 1e-4


def test_streaming_window_and_preemption_with_int8(models):
    """Windowed reads (sinks + window: the torch gather path) and preemption by recompute on a
    small int8 pool: tokens equal the int8 oracle's while the window holds the whole sequence."""
    ref, _, ours = models
    prompts = random_prompts(3, 20, 30, seed=3)
    llm = LLM(ours, kv_cache_dtype="int8", block_size=4, max_model_len=128, max_num_seqs=3,
              kv_cache_memory=KVCache.bytes_per_block(ours.config, 4, torch.float32, kv_cache_dtype="int8") * 24)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(16))
    assert llm.llm_engine.scheduler.num_preemptions > 0  # 24 blocks < 3 sequences of ~44 tokens
    for p, out in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(16):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(p):]
    win = LLM(ours, kv_cache_dtype="int8", block_size=4, streaming_window=64, num_sink_tokens=4)
    assert win.generate([{"prompt_token_ids": prompts[0]}], greedy(16))[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_speculative_dca_and_tensor_parallel_with_int8(models):
    """The other engine modes on an int8 cache: n-gram speculative decoding (verification rows
    and the KV trim of rejected tokens) gives the plain int8 engine's greedy tokens; dual chunk
    attention (unrotated keys, quantized as stored) gives fp32-cache DCA's, per-request YaRN
    (factors 1 and 4 in one batch) the fp32 cache's; tensor parallel
    (each rank's own int8 pool, the cache dtype sent to the worker) gives one process's."""
    import copy

    _, _, ours = models
    base = dict(kv_cache_dtype="int8", block_size=4, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_memory="4MiB")
    loop = [3, 1, 4, 1, 5, 9, 2, 6] * 4  # repetitive: the n-gram proposer finds matches
    prompts = [loop, random_prompts(1, 30, 30, seed=5)[0]]
    plain = token_ids(run_engine(LLMEngine(ours, None, **base), prompts, greedy(16)))
    spec = LLMEngine(ours, None, speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **base)
    assert token_ids(run_engine(spec, prompts, greedy(16))) == plain
    assert spec.spec.num_accepted_tokens > 0  # drafts were verified and some kept

    dca = copy.deepcopy(ours)
    fp32_dca = token_ids(run_engine(LLMEngine(dca, None, dual_chunk_attention="chunk_size=16,local_size=4",
                                              **(base | {"kv_cache_dtype": "auto"})), prompts, greedy(8)))  # fmt: skip
    int8_engine = LLMEngine(dca, None, dual_chunk_attention="chunk_size=16,local_size=4", **base)
    assert int8_engine.kv_cache.quantized
    assert token_ids(run_engine(int8_engine, prompts, greedy(8))) == fp32_dca

    rope = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 16}
    short_long = [prompts[0][:5], prompts[0]]  # per request: factor 1 and factor 4 in one batch
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)

    def prompt_lps(**kw) -> list[list[float]]:
        outs = LLM(copy.deepcopy(ours), **(base | kw)).generate(short_long, params, use_tqdm=False)
        return [prompt_logprob_values(o) for o in outs]

    per_request = prompt_lps(rope_scaling=rope | {"dynamic": True})
    no_scaling, static4 = prompt_lps(), prompt_lps(rope_scaling=rope)
    assert per_request[0] == no_scaling[0]  # factor 1: plain RoPE, bit for bit, on the int8 cache too
    assert per_request[1] == pytest.approx(static4[1], abs=1e-5)  # factor 4: static YaRN's
    assert static4[1] != pytest.approx(no_scaling[1], abs=1e-3)

    llm = LLM(copy.deepcopy(ours), tensor_parallel_size=2, **base)
    try:
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(16), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == plain


def test_cli_and_server_flags(tiny_hf_dir, capsys):
    from fastapi.testclient import TestClient

    from qwenkit.cli.main import build_parser, engine_kwargs
    from qwenkit.serve.app import create_app
    from qwenkit.serve.cli import add_serve_parser, settings_from_args
    from qwenkit.serve.engine_client import load_engine_client

    parser = build_parser()
    args = parser.parse_args(["generate", "-m", str(tiny_hf_dir), "hi", "--kv-cache-dtype", "int8"])
    assert engine_kwargs(args)["kv_cache_dtype"] == "int8"
    for cmd in (["eval", "ppl", "--text", "x"], ["eval", "passkey"], ["bench", "prefill"]):
        assert parser.parse_args(cmd + ["--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "-m", str(tiny_hf_dir), "hi", "--kv-cache-dtype", "fp8"])
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "not supported on this build" in err and "use int8" in err

    sp = argparse.ArgumentParser(prog="qwenkit")
    add_serve_parser(sp.add_subparsers(dest="command", required=True))
    s = settings_from_args(sp.parse_args(["serve", str(tiny_hf_dir), "--kv-cache-dtype", "int8", "--max-num-seqs", "2"]))
    assert s.engine_args["kv_cache_dtype"] == "int8"
    engines = []

    def factory():
        engines.append(load_engine_client(s.model, quantization="none", max_num_seqs=s.max_num_seqs, **s.engine_args))
        return engines[-1]

    with TestClient(create_app(s, factory)) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    kv = engines[0].core.kv_cache
    assert kv.quantized and kv.k_cache[0].dtype == torch.int8


def test_perplexity_through_the_int8_cache(models):
    """`eval ppl --kv-cache-dtype`: the paged-cache path equals the plain forward with an fp32
    cache and moves by a small, nonzero amount with int8."""
    from qwenkit.eval.perplexity import perplexity

    _, _, ours = models
    ids = random_prompts(1, 600, 600, seed=1)[0]
    plain = perplexity(ours, ids, n_ctx=300)
    fp32 = perplexity(ours, ids, n_ctx=300, kv_cache_dtype="auto")
    int8 = perplexity(ours, ids, n_ctx=300, kv_cache_dtype="int8")
    assert fp32.ppl == pytest.approx(plain.ppl, rel=1e-5)
    assert int8.ppl != fp32.ppl and math.isclose(int8.ppl, fp32.ppl, rel_tol=0.05)


@pytest.mark.slow
def test_real_05b_perplexity_cost_is_small(gguf_05b_path):
    """Real 0.5B (fp32 weights: only the cache differs), stdlib argparse.py, one window of 1024
    tokens through the paged cache in 512-token chunks. Measured: 5.5820 (fp32 cache) -> 5.6911
    (int8), +1.95 %, all of it from the keys (docs/benchmarks.md, "int8 KV cache"); this asserts
    the cost does not grow past 2.5 % and is not zero (the cache really is int8)."""
    import argparse as argparse_module
    from pathlib import Path

    from qwenkit.eval.perplexity import llama_tokenize, sliding_perplexity
    from qwenkit.loaders.load import load

    torch.set_num_threads(2)
    lm = load(str(gguf_05b_path), progress=False, quantization="none")
    ids = llama_tokenize(lm.tokenizer, Path(argparse_module.__file__).read_text())[:1024]
    fp32 = sliding_perplexity(lm.model, ids, n_ctx=1024, stride=512, kv_cache_dtype="auto")
    int8 = sliding_perplexity(lm.model, ids, n_ctx=1024, stride=512, kv_cache_dtype="int8")
    assert fp32.n_chunks == int8.n_chunks == 1 and fp32.n_scored == 1023
    assert int8.ppl > fp32.ppl  # the int8 cache is really in use
    assert int8.ppl / fp32.ppl - 1 <= 0.025, (int8.ppl, fp32.ppl)
