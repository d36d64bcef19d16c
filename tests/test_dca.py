"""Dual Chunk Attention (`qwenkit.model.dca`) against an independent dense reference.

The reference remaps the rotary positions of every (query, key) pair from the DCA rules, rotates
q and k per pair in float64 with its own RoPE formula, and takes one masked softmax. The
implementation under test runs per query block, three partial softmaxes merged by log-sum-exp,
in float32. Tolerances: 1e-5 (absolute, attention outputs / logits of the tiny model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.model.dca import (
    DualChunkConfig,
    DualChunkRope,
    DualChunkStats,
    dual_chunk_attention,
    enable_dual_chunk_attention,
    key_positions,
    parse_dual_chunk_attention,
    query_positions,
)
from qwenkit.sampling_params import SamplingParams
from tests.engine_helpers import greedy, naive_greedy, random_prompts, run_engine, token_ids
from tests.tiny import make_hf_and_ours, tiny_hf_config

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- the oracle
def dense_positions(t: int, cfg: DualChunkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T) rotary positions of the query and of the key for every pair (i, j)."""
    cs, cl = cfg.chunk_size, cfg.chunk_size - cfg.local_size
    i = torch.arange(t)[:, None].expand(t, t)
    j = torch.arange(t)[None, :].expand(t, t)
    ci, cj = i // cl, j // cl
    q_pos = torch.where(
        ci == cj, i % cl, torch.where(ci == cj + 1, torch.clamp(i % cl + cl, max=cs), min(2 * cl - 1, cs))
    )
    return q_pos, j % cl


def dense_dca(q, k, v, cfg: DualChunkConfig, theta: float, scale: float) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) unrotated -> (T, Hq, D), float64, one masked softmax."""
    t, hq, d = q.shape
    rep = hq // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def rot(x, pos):  # x (..., H, D), pos (...) -> rotated by angle pos * inv per half-pair
        ang = pos.double()[..., None, None] * inv
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)

    q_pos, k_pos = dense_positions(t, cfg)
    qr = rot(q[:, None].expand(t, t, hq, d), q_pos)  # (T, T, H, D): query i rotated for key j
    kr = rot(k[None].expand(t, t, hq, d), k_pos)
    logits = (qr * kr).sum(-1) * scale  # (T, T, H)
    l0 = cfg.original_max_position_embeddings
    if l0:
        temp = (0.1 * torch.log(torch.arange(1, t + 1, dtype=torch.float64) / l0) + 1).clamp(min=1)
        logits = logits * temp[:, None, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal[..., None], float("-inf"))
    p = logits.softmax(dim=1)  # over keys
    return torch.einsum("ijh,jhd->ihd", p, v)


class DenseBackend:
    """An attention backend that runs the oracle over the whole sequence (no cache)."""

    def attend_dual_chunk(self, layer_idx, q, k, v, rope: DualChunkRope, *, scale: float):
        outs = [dense_dca(q[b], k[b], v[b], rope.cfg, rope.theta, scale) for b in range(q.shape[0])]
        return torch.stack(outs).to(q.dtype)


def _qkv(t: int, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g))


# ---------------------------------------------------------------------- config
def test_parse_forms_and_errors() -> None:
    want = DualChunkConfig(2048, 256)
    assert parse_dual_chunk_attention("chunk_size=2048,local_size=256") == want
    assert parse_dual_chunk_attention('{"chunk_size": 2048, "local_size": 256}') == want
    assert parse_dual_chunk_attention({"chunk_size": 2048, "local_size": 256, "sparse_attention_enabled": True}) == want
    assert parse_dual_chunk_attention(None) is None
    with pytest.raises(ValueError, match="local_size must be in"):
        parse_dual_chunk_attention("chunk_size=16,local_size=16")
    with pytest.raises(ValueError, match="missing local_size"):
        parse_dual_chunk_attention("chunk_size=16")
    with pytest.raises(ValueError, match="chunk_size must be an integer"):
        parse_dual_chunk_attention("chunk_size=big,local_size=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_dual_chunk_attention("chunk=16,local_size=1")


def test_position_tables_match_vllm_caches() -> None:
    """The three query tables and the key table equal vLLM's cache lookups (DualChunkRotaryEmbedding:
    q_t = arange(cl), qc_t = (arange(cl) + cl).clamp(max=chunk_size), k_t = arange % cl,
    query_inter = qc_t[cl - 1])."""
    for cs, ls in ((16, 4), (8, 0), (16, 10), (2048, 256)):
        cfg = DualChunkConfig(cs, ls)
        cl = cs - ls
        pos = torch.arange(5 * cs)
        q_t = torch.arange(cl)
        qc_t = (torch.arange(cl) + cl).clamp(max=cs)
        intra, succ, inter = query_positions(pos, cfg)
        assert torch.equal(intra, q_t[pos % cl])
        assert torch.equal(succ, qc_t[pos % cl])
        assert torch.equal(inter, qc_t[cl - 1].expand_as(pos))
        assert torch.equal(key_positions(pos, cfg), torch.arange(5 * cs) % cl)


def test_hf_config_round_trip() -> None:
    hf = tiny_hf_config(dual_chunk_attention_config={"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 8})
    mc = ModelConfig.from_hf(hf)
    model = Qwen2ForCausalLM(mc)
    assert model.model.dual_chunk is not None and model.model.dual_chunk.cfg == DualChunkConfig(16, 4, 8)
    assert ModelConfig.from_hf(mc.to_hf()).dual_chunk_attention_config == hf["dual_chunk_attention_config"]


# ---------------------------------------------------------------------- attention
@pytest.mark.parametrize(
    "cs,ls,l0,t,block_q,block_k",
    [
        (16, 4, 0, 70, 256, 4096),  # 6 chunks of 12: intra, successive and inter parts
        (16, 4, 0, 70, 5, 7),  # query and inter-key blocks split inside chunks
        (8, 0, 0, 41, 3, 5),  # local_size 0: the successive query table is clamped everywhere
        (16, 6, 8, 50, 4, 9),  # with the length temperature (L0 = 8)
        (16, 10, 0, 40, 256, 4096),  # local_size > chunk_len: the inter query sits at 2 * cl - 1 < chunk_size
    ],
)
def test_equals_dense_reference(cs, ls, l0, t, block_q, block_k) -> None:
    cfg = DualChunkConfig(cs, ls, l0)
    rope = DualChunkRope(16, 10000.0, cfg)
    q, k, v = _qkv(t)
    scale = 0.25
    got = dual_chunk_attention(q, k, v, torch.arange(t), rope, scale=scale, block_q=block_q, block_k=block_k)
    want = dense_dca(q, k, v, cfg, 10000.0, scale)
    assert (got.double() - want).abs().max() < TOL
    # a suffix of the queries against the full history = those rows of the full prefill
    part = dual_chunk_attention(q[t - 9 :], k, v, torch.arange(t - 9, t), rope, scale=scale, block_q=block_q)
    assert (part.double() - want[t - 9 :]).abs().max() < TOL


def test_autograd_path_equals_dense_reference() -> None:
    """With gradients on, the parts run as plain torch ops (not the CPU flash op): same result,
    and it backpropagates."""
    cfg = DualChunkConfig(16, 4)
    rope = DualChunkRope(16, 10000.0, cfg)
    q, k, v = (t.requires_grad_() for t in _qkv(45, seed=2))
    got = dual_chunk_attention(q, k, v, torch.arange(45), rope, scale=0.25, block_q=7, block_k=6)
    assert (got.double() - dense_dca(q.detach(), k.detach(), v.detach(), cfg, 10000.0, 0.25)).abs().max() < TOL
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


def test_model_logits_equal_dense_reference() -> None:
    _, model = make_hf_and_ours(seed=3)
    ids = torch.randint(0, 256, (2, 61), generator=torch.Generator().manual_seed(0))
    logits = []
    for spec in ("chunk_size=16,local_size=4", "chunk_size=16,local_size=4,original_max_position_embeddings=8"):
        enable_dual_chunk_attention(model, spec)
        with torch.no_grad():
            got = model(ids)
            want = model(ids, torch.arange(61).expand(2, 61), DenseBackend())
        assert (got - want).abs().max() < TOL
        logits.append(got)
    assert (logits[0] - logits[1]).abs().max() > 20 * TOL  # the length temperature is in effect


def test_equals_plain_attention_within_one_chunk() -> None:
    """A sequence inside one chunk (T <= chunk_size - local_size) sees true distances only: the
    logits equal transformers' plain Qwen2 (eager attention)."""
    ref, model = make_hf_and_ours(seed=1)
    enable_dual_chunk_attention(model, {"chunk_size": 40, "local_size": 8})
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert (got - want).abs().max() < TOL
    with torch.no_grad():  # one token more and the successive-chunk clamp changes the result
        ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
        assert (model(ids) - ref(ids).logits)[:, 32:].abs().max() > 1e-3


# ---------------------------------------------------------------------- engine
DCA = "chunk_size=16,local_size=4"


def _engine(model, **kw: Any) -> LLMEngine:
    args = {"kv_cache_memory": "1MiB", "max_num_seqs": 4, "max_num_batched_tokens": 24, "dual_chunk_attention": DCA} | kw
    return LLMEngine(model, install_cpu_runtime=True, **args)


@pytest.fixture(scope="module")
def dca_model() -> Qwen2ForCausalLM:
    _, model = make_hf_and_ours(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # confident argmax (see tests/engine_helpers.py)
    return model


def test_engine_greedy_equals_dense_recompute(dca_model) -> None:
    """Chunked prefill (24 tokens a step), batched decodes and the paged cache with unrotated
    keys: the greedy tokens equal a loop that recomputes the whole sequence with the oracle;
    the rotary distances used stay within [0, chunk_size] and reach its clamp."""
    prompts = random_prompts(6, 20, 70, seed=4)
    engine = _engine(dca_model)
    stats = dca_model.model.dual_chunk.stats = DualChunkStats()
    try:
        got = token_ids(run_engine(engine, prompts, greedy(8), stagger=2))
    finally:
        dca_model.model.dual_chunk.stats = None
    want = [naive_greedy(dca_model, p, 8, lambda n: DenseBackend()) for p in prompts]
    assert got == want
    assert stats.calls > 0
    assert 0 <= stats.min_relative_position and stats.max_relative_position == 16  # min(2*12-1, 16)


def test_prefill_then_decode_equals_longer_prefill(dca_model) -> None:
    """The log-prob of the 2nd generated token (a decode at position N) equals the prompt log-prob
    of that token when prompt + both tokens are prefilled in one go (and in 5-token chunks)."""
    prompt = random_prompts(1, 50, 50, seed=7)[0]
    engine = _engine(dca_model)
    out = run_engine(engine, [prompt], greedy(2, logprobs=0))[0].outputs[0]
    t1, t2 = out.token_ids
    decode_lp = out.logprobs[1][t2].logprob
    for chunk in (64, 5):
        engine = _engine(dca_model, max_num_batched_tokens=chunk, enable_prefix_caching=False)
        full = run_engine(engine, [prompt + [t1, t2]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        assert abs(full.prompt_logprobs[-1][t2].logprob - decode_lp) < TOL


def test_engine_rejects_streaming_with_dca(dca_model) -> None:
    with pytest.raises(ValueError, match="streaming_window"):
        _engine(dca_model, streaming_window=32)


def test_length_temperature_in_engine() -> None:
    """With original_max_position_embeddings the engine applies each query's temperature as the
    oracle does (same greedy tokens)."""
    _, model = make_hf_and_ours(seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    prompts = random_prompts(2, 30, 50, seed=9)
    engine = _engine(model, dual_chunk_attention=DCA + ",original_max_position_embeddings=8")
    got = token_ids(run_engine(engine, prompts, greedy(4)))
    assert got == [naive_greedy(model, p, 4, lambda n: DenseBackend()) for p in prompts]


def test_cli_option_reaches_engine_kwargs() -> None:
    from qwenkit.cli.main import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "hi", "--dual-chunk-attention", "chunk_size=2048,local_size=256"])
    assert engine_kwargs(args)["dual_chunk_attention"] == "chunk_size=2048,local_size=256"


def test_cli_generate_with_dca(tiny_hf_dir: Path) -> None:
    from qwenkit.cli.main import main

    assert main(["generate", "--model", str(tiny_hf_dir), "-q", "none", "--max-tokens", "3", "--json",
                 "--dual-chunk-attention", "chunk_size=8,local_size=2", "hello world " * 4]) == 0  # fmt: skip


# ---------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_real_passkey_dca_vs_full(gguf_05b_path) -> None:
    """Real 0.5B, a ~6K-token passkey prompt: full attention vs DCA emulating a 2K trained window
    (chunk_size 2048, local_size 256). Asserts what DCA guarantees (every rotary distance used is
    within [0, 2048] and the clamp is reached) and logs the retrieval. Depths: $DCA_PASSKEY_DEPTHS
    (default 0.5; the evidence run in docs/benchmarks.md uses 0,0.25,0.5,0.75,1), modes
    $DCA_PASSKEY_MODES (default dca alone, to stay near a minute; the evidence: full,dca,window —
    window is a 2K sliding window + 4 sinks), prompt length $DCA_PASSKEY_TOKENS (default 6000);
    results JSON to $DCA_PASSKEY_JSON when set."""
    import os

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the module fixture pins 1 thread for the tiny tests
    try:
        _passkey_run(gguf_05b_path)
    finally:
        torch.set_num_threads(threads)


def _passkey_run(gguf_05b_path) -> None:
    import json
    import logging
    import os
    import time

    from qwenkit.eval.passkey import build_prompt, score
    from qwenkit.loaders.load import load

    loaded = load(gguf_05b_path, progress=False)
    tok = loaded.tokenizer
    depths = [float(d) for d in os.environ.get("DCA_PASSKEY_DEPTHS", "0.5").split(",")]
    keys = [68217, 40931, 15526, 77302, 52981]
    n_tokens = int(os.environ.get("DCA_PASSKEY_TOKENS", "6000"))
    prompts = [build_prompt(tok, n_tokens, d, str(keys[i % len(keys)]))[0] for i, d in enumerate(depths)]
    stats = DualChunkStats()
    rows = []
    # "full,dca,window" for the comparison; window = StreamingLLM's 2K sliding window + 4 sinks
    # dca last: the DCA engine attaches its configuration to the shared model
    modes = sorted(os.environ.get("DCA_PASSKEY_MODES", "dca").split(","), key=lambda m: m == "dca")
    for mode in modes:
        args: dict[str, Any] = {"kv_cache_memory": "512MiB", "max_model_len": 8192, "max_num_seqs": len(prompts)}
        if mode == "dca":
            args["dual_chunk_attention"] = "chunk_size=2048,local_size=256"
        elif mode == "window":
            args.update(streaming_window=2048, num_sink_tokens=4)
        engine = LLMEngine(loaded.model, tok, **args)
        if mode == "dca":
            loaded.model.model.dual_chunk.stats = stats
        t0, c0 = time.perf_counter(), time.process_time()
        outs = run_engine(engine, prompts, greedy(8))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for i, (d, o) in enumerate(zip(depths, outs)):
            text = tok.decode(o.outputs[0].token_ids)
            ok = score(text, str(keys[i % len(keys)]))
            rows.append({"mode": mode, "depth": d, "prompt_tokens": len(prompts[i]), "output": text, "retrieved": ok})
            logging.getLogger(__name__).warning("passkey %s depth %.1f (%d tokens): %r %s", mode, d, len(prompts[i]), text, ok)
        rows.append({"mode": mode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)})
    loaded.model.model.dual_chunk.stats = None
    if os.environ.get("DCA_PASSKEY_JSON"):
        with open(os.environ["DCA_PASSKEY_JSON"], "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "max_relative_position": stats.max_relative_position,
                       "prompt_tokens": n_tokens,
                       "results": rows}, f, indent=1)  # fmt: skip
    assert stats.calls > 0 and stats.min_relative_position >= 0
    assert stats.max_relative_position == 2048  # min(2 * 1792 - 1, 2048): never past the window
