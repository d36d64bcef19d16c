"""RoPE scaling (linear, dynamic NTK, YaRN, NTK-alpha, per-request YaRN) against transformers'
Qwen2ForCausalLM on tiny random models, the GGUF rope-scaling keys, and the engine's
per-request YaRN factor (mixed batches, prefix cache). Checked with transformers 5.24."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.loaders.gguf import GGUFFile
from qwenkit.loaders.load import load, parse_rope_scaling
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.model.layers import RopeScalingError, RotaryEmbedding, dynamic_ntk_inv_freq
from tests.engine_helpers import greedy, naive_greedy, random_prompts, run_engine, tiny_model, token_ids
from tests.tiny import make_hf_and_ours, tiny_hf_config

ATOL = 1e-5  # fp32 logits, ours vs transformers
SEQ_LEN = 150  # beyond every original_max_position_embeddings below
HEAD_DIM = 16  # tiny config: hidden 64 / 4 heads
THETA = 10000.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _default_inv_freq() -> torch.Tensor:
    return 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


YARN_CASES = {
    "yarn-f4-orig32": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-f4-orig64": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-f4-orig128-mscale": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 0.707, "mscale_all_dim": 1.0,
    },
    "yarn-f8-beta-notruncate-attn": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 48,
        "beta_fast": 16, "beta_slow": 2, "truncate": False, "attention_factor": 1.25,
    },
}  # fmt: skip


def _expected_attention_factor(rs: dict) -> float:
    if "attention_factor" in rs:
        return rs["attention_factor"]
    f = rs["factor"]
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return (0.1 * rs["mscale"] * math.log(f) + 1) / (0.1 * rs["mscale_all_dim"] * math.log(f) + 1)
    return 0.1 * math.log(f) + 1


def _logits(ref, ours, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ref(ids).logits, ours(ids)


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_matches_transformers(name: str) -> None:
    rs = YARN_CASES[name]
    ref, ours = make_hf_and_ours(rope_scaling=dict(rs))
    # pin what transformers really uses: the attention factor and a scaled inv_freq
    hf_rot = ref.model.rotary_emb
    assert hf_rot.rope_type == "yarn"
    assert hf_rot.attention_scaling == pytest.approx(_expected_attention_factor(rs), rel=1e-12)
    default = _default_inv_freq().float()
    assert torch.allclose(hf_rot.inv_freq[-1], default[-1] / rs["factor"], rtol=1e-6)  # slowest pair interpolated
    assert torch.equal(hf_rot.inv_freq[0], default[0])  # fastest pair kept
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf_rot.inv_freq)
    assert ours.model.rotary_emb.attention_scaling == hf_rot.attention_scaling
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    a, b = _logits(ref, ours, ids)
    assert (a - b).abs().max().item() <= ATOL
    # the scaling matters: plain RoPE gives other logits
    plain = copy.deepcopy(ours)
    plain.set_rope_scaling(None)
    with torch.no_grad():
        assert (plain(ids) - b).abs().max().item() > 1e-3


def test_config_from_transformers_rope_parameters() -> None:
    """transformers 5 writes `rope_parameters` (theta inside): ModelConfig reads the same scaling."""
    rs = YARN_CASES["yarn-f4-orig32"]
    ref, ours = make_hf_and_ours(rope_scaling=dict(rs))
    hf_dict = ref.config.to_dict()
    assert "rope_scaling" not in hf_dict and hf_dict["rope_parameters"]["rope_type"] == "yarn"
    cfg = ModelConfig.from_hf(hf_dict)
    rot = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(rot.inv_freq, ours.model.rotary_emb.inv_freq)
    assert rot.attention_scaling == ours.model.rotary_emb.attention_scaling


def test_linear_matches_transformers() -> None:
    ref, ours = make_hf_and_ours(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert torch.allclose(ref.model.rotary_emb.inv_freq, _default_inv_freq().float() / 2, rtol=1e-6)
    ids = torch.randint(0, 256, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    a, b = _logits(ref, ours, ids)
    assert (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("seq_len", [40, SEQ_LEN])  # within / beyond max_position_embeddings (64)
def test_dynamic_ntk_matches_transformers(seq_len: int) -> None:
    ref, ours = make_hf_and_ours(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    ids = torch.randint(0, 256, (2, seq_len), generator=torch.Generator().manual_seed(3))
    a, b = _logits(ref, ours, ids)
    assert (a - b).abs().max().item() <= ATOL
    hf_inv = ref.model.rotary_emb.inv_freq  # updated by transformers' dynamic forward
    if seq_len > 64:
        assert torch.equal(hf_inv, dynamic_ntk_inv_freq(HEAD_DIM, THETA, 2.0, 64, seq_len))
        assert hf_inv[-1] < _default_inv_freq().float()[-1] * 0.99  # the base really grew
    else:
        assert torch.allclose(hf_inv, _default_inv_freq().float(), rtol=1e-6)


def test_ntk_alpha_inv_freq_by_hand() -> None:
    alpha = 3.0
    rot = RotaryEmbedding(HEAD_DIM, 512, THETA, {"rope_type": "ntk", "alpha": alpha})
    base = THETA * alpha ** (HEAD_DIM / (HEAD_DIM - 2))
    by_hand = [1.0 / base ** (2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]
    assert torch.allclose(rot.inv_freq.double(), torch.tensor(by_hand, dtype=torch.float64), rtol=1e-6, atol=0)
    assert rot.attention_scaling == 1.0
    cos, _ = rot(torch.arange(10)[None], torch.float32)
    assert torch.allclose(cos[0, 9, 0, :8].double(), torch.cos(9 * torch.tensor(by_hand, dtype=torch.float64)), atol=1e-6)


@pytest.mark.parametrize(
    "rs, field",
    [
        ({"rope_type": "longrope", "factor": 2}, "rope_scaling.rope_type"),
        ({"rope_type": "yarn", "factor": 0.5}, "rope_scaling.factor"),
        ({"rope_type": "linear"}, "rope_scaling.factor"),
        ({"rope_type": "ntk", "factor": 2}, "rope_scaling.alpha"),
    ],
)
def test_bad_rope_scaling_names_the_field(rs: dict, field: str) -> None:
    with pytest.raises(RopeScalingError, match=field.replace(".", r"\.")):
        RotaryEmbedding(HEAD_DIM, 512, THETA, rs)
    with pytest.raises(RopeScalingError, match=field.replace(".", r"\.")):
        parse_rope_scaling(json.dumps(rs))


def test_parse_rope_scaling_json() -> None:
    with pytest.raises(RopeScalingError, match="invalid JSON"):
        parse_rope_scaling("{factor: 4")
    assert parse_rope_scaling('{"rope_type": "default"}') is None
    with pytest.raises(RopeScalingError, match=r"rope_scaling\.rope_type is missing"):
        parse_rope_scaling('{"factor": 4}')
    assert parse_rope_scaling('{"type": "yarn", "factor": 4}') == {"type": "yarn", "factor": 4}


# ---------------------------------------------------------------------------------- GGUF


def _gguf_with(tmp_path, write_keys):
    from tests.gguf_tiny import write_tiny_gguf

    _, ours = make_hf_and_ours()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, ours, "F32", metadata=write_keys)
    return GGUFFile.open(path)


def test_gguf_yarn_keys(tmp_path) -> None:
    import gguf

    def keys(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_rope_scaling_yarn_beta_fast(16.0)
        w.add_rope_scaling_yarn_beta_slow(2.0)

    cfg = _gguf_with(tmp_path, keys).config()
    assert cfg.rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0,
    }  # fmt: skip
    # the model built from it rotates with transformers' YaRN of the same dict
    ref, _ = make_hf_and_ours(rope_scaling=dict(cfg.rope_scaling))
    ours = Qwen2ForCausalLM(cfg)
    assert torch.equal(ours.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert ours.model.rotary_emb.attention_scaling == ref.model.rotary_emb.attention_scaling


def test_gguf_attn_factor_and_linear(tmp_path) -> None:
    import gguf

    def yarn_attn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_attn_factors(0.5)

    rs = _gguf_with(tmp_path, yarn_attn).config().rope_scaling
    assert rs["attention_factor"] == pytest.approx(0.5 * (0.1 * math.log(4) + 1))  # llama.cpp: a multiplier
    assert "original_max_position_embeddings" not in rs  # HF default: max_position_embeddings

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    assert _gguf_with(tmp_path, linear).config().rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert _gguf_with(tmp_path, lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.NONE)).config().rope_scaling is None
    assert _gguf_with(tmp_path, None).config().rope_scaling is None


def test_gguf_unsupported_type_is_an_error(tmp_path) -> None:
    import gguf

    from qwenkit.errors import ModelIntegrityError

    def longrope(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_factor(4.0)

    with pytest.raises(ModelIntegrityError, match=r"qwen2\.rope\.scaling\.type 'longrope'"):
        _gguf_with(tmp_path, longrope).config()


# ---------------------------------------------------------------------------------- loading, CLI


def test_load_and_llm_take_rope_scaling(tiny_hf_dir) -> None:
    from qwenkit.cli.main import build_parser
    from qwenkit.engine.llm import LLM

    rs = '{"rope_type":"yarn","factor":4,"original_max_position_embeddings":32}'
    lm = load(tiny_hf_dir, quantization="none", progress=False, rope_scaling=rs)
    rot = lm.model.model.rotary_emb
    assert rot.kind == "yarn" and rot.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert lm.model.config.rope_scaling["factor"] == 4
    llm = LLM(load(tiny_hf_dir, quantization="none", progress=False), rope_scaling=json.loads(rs), kv_cache_memory="1MiB")
    assert llm.llm_engine.model.model.rotary_emb.kind == "yarn"
    llm = LLM(tiny_hf_dir, quantization="none", hf_overrides={"rope_scaling": {"rope_type": "linear", "factor": 2}},
              kv_cache_memory="1MiB")  # fmt: skip
    assert llm.llm_engine.model.model.rotary_emb.kind == "linear"
    with pytest.raises(ValueError, match="hf_overrides.*max_position_embeddings"):
        LLM(tiny_hf_dir, hf_overrides={"max_position_embeddings": 9})
    for argv in (["generate", "hi"], ["chat"], ["serve"], ["eval", "ppl", "--text", "f.txt"], ["eval", "humaneval"]):
        assert build_parser().parse_args([*argv, "--rope-scaling", rs]).rope_scaling == rs, argv


def test_max_model_len_covers_the_scaled_context() -> None:
    model = copy.deepcopy(tiny_model(seed=0))
    model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    assert LLMEngine(model, None, kv_cache_memory="2MiB").max_model_len == 512  # native: max(512, 4 * 128)
    model.set_rope_scaling({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128})
    assert LLMEngine(model, None, kv_cache_memory="2MiB").max_model_len == 1024


# ---------------------------------------------------------------------------------- per-request YaRN

ORIG = 32
DYNAMIC = {"rope_type": "yarn", "factor": 4.0, "dynamic": True, "original_max_position_embeddings": ORIG}
MAX_TOKENS = 8


def _with_rope(rs: dict | None) -> Qwen2ForCausalLM:
    model = copy.deepcopy(tiny_model(seed=0))
    model.set_rope_scaling(rs)
    return model


def _static(factor: float) -> Qwen2ForCausalLM:
    if factor == 1:
        return tiny_model(seed=0)
    return _with_rope({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ORIG})


def test_dynamic_factors_and_tables() -> None:
    rot = _with_rope(DYNAMIC).model.rotary_emb
    assert rot.factors == (1.0, 2.0, 4.0)
    assert [rot.factor_index(n) for n in (1, 32, 33, 64, 65, 128, 500)] == [0, 0, 1, 1, 2, 2, 2]
    plain = RotaryEmbedding(HEAD_DIM, 512, THETA)
    pos = torch.arange(200)[None]
    for i, f in enumerate(rot.factors):
        cos, sin = rot(pos, torch.float32, torch.full_like(pos, i))
        if f == 1:  # factor 1 is plain RoPE, bit for bit
            assert torch.equal(cos, plain(pos, torch.float32)[0]) and torch.equal(sin, plain(pos, torch.float32)[1])
        else:
            static = _static(f).model.rotary_emb
            assert torch.equal(cos, static(pos, torch.float32)[0]) and torch.equal(sin, static(pos, torch.float32)[1])


def test_per_request_factor_mixed_batch() -> None:
    # prompt + max_tokens: <= 32 -> factor 1, <= 64 -> 2, <= 128 -> 4
    lengths = [10, 20, 40, 50, 90, 100, 5, 45, 110]
    factors = [1, 1, 2, 2, 4, 4, 1, 2, 4]
    prompts = [p[:n] for p, n in zip(random_prompts(len(lengths), 120, 120, seed=4), lengths)]
    params = greedy(MAX_TOKENS, logprobs=0)
    engine = LLMEngine(_with_rope(DYNAMIC), None, kv_cache_memory="2MiB", max_num_seqs=8, max_num_batched_tokens=64)
    outs = run_engine(engine, prompts, params)
    seqs_factor = [engine.model.model.rotary_emb.factors[engine.model.model.rotary_emb.factor_index(n + MAX_TOKENS)] for n in lengths]
    assert seqs_factor == factors
    # each request equals the full-recompute oracle of a model with that static YaRN factor
    for out, prompt, f in zip(outs, prompts, factors):
        assert out.outputs[0].token_ids == naive_greedy(_static(f), prompt, MAX_TOKENS), f
    # factor-1 requests: bit-identical to an engine without scaling on the same batch
    plain = LLMEngine(tiny_model(seed=0), None, kv_cache_memory="2MiB", max_num_seqs=8, max_num_batched_tokens=64)
    plain_outs = run_engine(plain, prompts, params)
    for out, ref, f in zip(outs, plain_outs, factors):
        if f == 1:
            assert out.outputs[0].token_ids == ref.outputs[0].token_ids
            assert out.outputs[0].cumulative_logprob == ref.outputs[0].cumulative_logprob
        else:
            assert out.outputs[0].cumulative_logprob != ref.outputs[0].cumulative_logprob
    # and so is a whole engine where every request fits factor 1
    short = [p[:20] for p in prompts]
    assert token_ids(run_engine(LLMEngine(_with_rope(DYNAMIC), None, kv_cache_memory="2MiB"), short, params)) == \
        token_ids(run_engine(LLMEngine(tiny_model(seed=0), None, kv_cache_memory="2MiB"), short, params))


def test_prefix_cache_not_shared_across_factors() -> None:
    prompt = random_prompts(1, 48, 48, seed=5)[0]  # 3 full blocks of 16
    engine = LLMEngine(_with_rope(DYNAMIC), None, kv_cache_memory="2MiB", block_size=16)
    bm = engine.block_manager

    def run(max_tokens: int) -> tuple[list[int], int]:
        hits = bm.prefix_cache_hits
        out = run_engine(engine, [prompt], greedy(max_tokens))[0]
        return out.outputs[0].token_ids, bm.prefix_cache_hits - hits

    first, hits = run(4)  # 52 tokens: factor 2
    assert hits == 0
    other, hits = run(40)  # 88 tokens: factor 4, same prompt: no hit
    assert hits == 0
    assert other == naive_greedy(_static(4), prompt, 40)
    again, hits = run(5)  # factor 2 again: the first request's blocks
    assert hits == 2 and again[:4] == first
    assert again == naive_greedy(_static(2), prompt, 5)


def test_hf_config_parity_for_engine_factor_one() -> None:
    """A dynamic-YaRN model scoring a short text (no engine) uses factor 1: plain logits, bit for bit."""
    ids = torch.tensor(random_prompts(1, 30, 30, seed=6))
    with torch.no_grad():
        assert torch.equal(_with_rope(DYNAMIC)(ids), tiny_model(seed=0)(ids))
        assert torch.equal(_with_rope(DYNAMIC)(torch.tensor(random_prompts(1, 60, 60, seed=6))),
                           _static(2)(torch.tensor(random_prompts(1, 60, 60, seed=6))))


def test_tiny_config_fields() -> None:
    # ModelConfig.to_hf round-trips the scaling dict (export keeps it)
    cfg = ModelConfig.from_hf(tiny_hf_config(rope_scaling=dict(DYNAMIC)))
    assert ModelConfig.from_hf(cfg.to_hf()).rope_scaling == DYNAMIC
    # transformers accepts our exported dict for a static type
    rs = YARN_CASES["yarn-f4-orig32"]
    assert ModelConfig.from_hf(ModelConfig.from_hf(tiny_hf_config(rope_scaling=rs)).to_hf()).rope_scaling == rs


# ---------------------------------------------------------------------------------- real 0.5B


@pytest.mark.slow
def test_real_static_yarn_changes_logits_per_request_does_not(gguf_05b_path) -> None:
    """Qwen2.5-Coder-0.5B on a 2,048-token code text (argparse.py): static YaRN x4 moves every
    prompt log-prob; per-request YaRN picks factor 1 for it and leaves them bit-identical."""
    import argparse as stdlib_argparse
    from pathlib import Path

    lm = load(gguf_05b_path, quantization="none", progress=False)
    ids = lm.tokenizer.encode(Path(stdlib_argparse.__file__).read_text())[:2048]
    params = greedy(1, prompt_logprobs=0)

    def prompt_logprobs(rope_scaling: dict | None) -> torch.Tensor:
        lm.model.set_rope_scaling(rope_scaling)
        engine = LLMEngine(lm.model, lm.tokenizer, kv_cache_memory="128MiB", max_num_batched_tokens=512)
        out = run_engine(engine, [ids], params)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])

    plain = prompt_logprobs(None)
    per_request = prompt_logprobs({"rope_type": "yarn", "factor": 4.0, "dynamic": True, "original_max_position_embeddings": 32768})
    static = prompt_logprobs({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    lm.model.set_rope_scaling(None)
    assert torch.equal(per_request, plain)
    assert (static - plain).abs().max().item() > 0.05
    assert (static - plain).abs().mean().item() > 1e-3
