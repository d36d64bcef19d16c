"""The fused decode step (`qwenkit.cpu.decode_step`): the whole layer stack of a decode step in
one C call. It runs the same kernels in the same order as the per-module path, so the logits
must be *bit-identical* (torch.equal, no tolerance) — through the contiguous cache and through
the engine's paged cache — and it must step aside whenever it does not apply."""
from __future__ import annotations

import copy

import pytest
import torch

from qwenkit.cpu import build, decode_step
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.model import ContiguousKVCache
from qwenkit.quant import quantize_model
from tests.engine_helpers import greedy, random_prompts, run_engine, token_ids
from tests.tiny import make_hf_and_ours

pytestmark = pytest.mark.skipif(build.lib() is None, reason="needs the C kernels (gcc, AVX2)")

# head_dim 64 (the attention kernel's), K % 64 == 0 everywhere (the int4 kernel's)
TINY = dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)


def _model(policy: str, seed: int = 3) -> torch.nn.Module:
    _, ours = make_hf_and_ours(seed=seed, **TINY)
    return quantize_model(ours, policy)


class _Spy:
    """Counts the fused steps that ran (returned hidden states) and the ones that declined."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran = self.declined = 0
        real = decode_step.run

        def spy(*a, **k):
            out = real(*a, **k)
            if out is None:
                self.declined += 1
            else:
                self.ran += 1
            return out

        monkeypatch.setattr(decode_step, "run", spy)


def _decode_contiguous(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    cfg = model.config
    b, t = ids.shape
    cache = ContiguousKVCache(cfg.num_hidden_layers, b, t + 1, cfg.num_key_value_heads, cfg.head_dim)
    with torch.inference_mode():
        cache.begin(prefill)
        steps = [model(ids[:, :prefill], torch.arange(prefill).expand(b, prefill), cache)]
        for i in range(prefill, t):
            cache.begin(1)
            steps.append(model(ids[:, i : i + 1], torch.full((b, 1), i), cache))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("policy", ["int8", "int4-g32", "int4-g64,down_proj=int8,o_proj=int8"])
def test_contiguous_cache_bit_identical(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(policy)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    spy = _Spy(monkeypatch)
    fused = _decode_contiguous(model, ids, prefill=7)
    assert spy.ran == 13  # every decode step ran fused (the prefill declined: no decode view)
    monkeypatch.setattr(decode_step, "run", lambda *a, **k: None)
    plain = _decode_contiguous(model, ids, prefill=7)
    assert torch.equal(fused, plain)


def test_engine_paged_cache_same_tokens_and_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed prompt lengths, block size 4 (keys span many blocks), staggered arrivals (steps
    that mix prefill and decode decline; pure decode steps run fused)."""
    model = _model("int8", seed=5)
    prompts = random_prompts(6, 1, 23, seed=2)
    params = greedy(12, logprobs=2)

    def run() -> list:
        engine = LLMEngine(model, None, max_num_seqs=4, block_size=4, max_model_len=64)
        return run_engine(engine, prompts, params, stagger=2)

    spy = _Spy(monkeypatch)
    fused = run()
    assert spy.ran > 10
    monkeypatch.setattr(decode_step, "run", lambda *a, **k: None)
    plain = run()
    assert token_ids(fused) == token_ids(plain)
    lp_fused = [[lp for lp in o.outputs[0].logprobs] for o in fused]
    lp_plain = [[lp for lp in o.outputs[0].logprobs] for o in plain]
    assert lp_fused == lp_plain


def test_declines_when_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    # fp32 linears: no plan
    _, fp32 = make_hf_and_ours(seed=3, **TINY)
    assert decode_step.plan_for(fp32.model) is None
    _decode_contiguous(fp32, ids, prefill=3)
    assert spy.ran == 0 and spy.declined == 4  # the prefill and 3 decode steps
    # more rows than the linears' small-M kernel takes
    model = _model("int8")
    plan = decode_step.plan_for(model.model)
    assert plan is not None and plan.max_rows == 64
    spy.ran = spy.declined = 0
    _decode_contiguous(model, ids.expand(65, 6), prefill=3)
    assert spy.ran == 0 and spy.declined == 4  # the prefill and 3 decode steps
    # autograd: the modules run
    with torch.enable_grad():
        cfg = model.config
        cache = ContiguousKVCache(cfg.num_hidden_layers, 1, 8, cfg.num_key_value_heads, cfg.head_dim)
        cache.begin(1)
        h = torch.zeros(1, 1, 256, requires_grad=True)
        rope = (torch.ones(1, 1, 1, 64), torch.zeros(1, 1, 1, 64))
        assert decode_step.run(model.model, h, rope, cache) is None


def test_window_that_hides_keys_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 5
    spy = _Spy(monkeypatch)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    _decode_contiguous(model, ids, prefill=3)
    assert spy.ran == 2  # positions 3, 4 see <= 5 keys; from position 5 on the window cuts


def test_plan_follows_module_swaps() -> None:
    model = _model("int8")
    plan = decode_step.plan_for(model.model)
    assert decode_step.plan_for(model.model) is plan  # cached
    other = copy.deepcopy(model)
    model.model.layers[1].mlp.down_proj = other.model.layers[1].mlp.down_proj
    fresh = decode_step.plan_for(model.model)
    assert fresh is not plan and fresh is not None
    assert fresh.ptrs[4 * 1 + 3] == other.model.layers[1].mlp.down_proj.qweight.data_ptr()
