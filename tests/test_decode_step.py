"""The fused decode step (`qwenkit.cpu.decode_step`): the whole layer stack of a decode step in
one C call. It runs the same kernels in the same order as the per-module path, so the logits
must be *bit-identical* (torch.equal, no tolerance) — through the contiguous cache and through
the engine's paged cache — and it must step aside whenever it does not apply."""
from __future__ import annotations

import copy

import pytest
import torch

from qwenkit import cpu
from qwenkit.cpu import build, decode_step
from qwenkit.engine.contiguous_cache import ContiguousKVCache
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.quant import quantize_model
from tests.engine_helpers import greedy, random_prompts, run_engine, token_ids
from tests.tiny import make_hf_and_ours

pytestmark = pytest.mark.skipif(build.lib() is None, reason="needs the C kernels (gcc, AVX2)")

# head_dim 64 (the attention kernel's), K % 64 == 0 everywhere (the int4 kernel's)
TINY = dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)


def _model(policy: str, seed: int = 3) -> torch.nn.Module:
    _, ours = make_hf_and_ours(seed=seed, **TINY)
    return cpu.install(quantize_model(ours, policy))


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
    cpu.install(fp32)
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
    assert fresh.layouts[4 * 1 + 3].w is other.model.layers[1].mlp.down_proj.qweight


# ------------------------------------------------------------------ the plan owns its validity
# Each change below either makes the fused step decline (the module path runs) or keeps it
# bit-identical to the module path of the changed model — never silently different logits.


def _fused_and_plain(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    spy = _Spy(monkeypatch)
    fused = _decode_contiguous(model, ids, prefill=5)
    with monkeypatch.context() as m:
        m.setattr(decode_step, "run", lambda *a, **k: None)
        plain = _decode_contiguous(model, ids, prefill=5)
    return fused, plain, spy.ran


class _LoRA(torch.nn.Module):
    """A LoRA-style wrapper: base(x) + B(A(x)) * scale."""

    def __init__(self, base: torch.nn.Module, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def test_wrapped_linear_takes_the_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")
    before, _, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 7
    layer = model.model.layers[1].self_attn
    layer.o_proj = _LoRA(layer.o_proj)
    fused, plain, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 0  # the plan no longer applies
    assert torch.equal(fused, plain)
    assert not torch.equal(fused, before)  # the adapter is really in the computation


def test_subclassed_or_hooked_module_takes_the_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")

    class Tweaked(type(model.model.layers[0].mlp)):  # a subclass may change the math
        def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
            return 2 * super().act_and_mul(gate_up)

    mlp = model.model.layers[0].mlp
    mlp.__class__ = Tweaked
    fused, plain, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 0 and torch.equal(fused, plain)
    mlp.__class__ = Tweaked.__bases__[0]
    handle = model.model.layers[2].input_layernorm.register_forward_hook(lambda m, i, o: o * 0.5)
    fused, plain, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 0 and torch.equal(fused, plain)
    handle.remove()
    _, _, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 7


def test_changed_rope_table_stays_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """cos/sin come from the model's rotary module each step: a new table (another base, as a
    long-context extension sets) reaches the fused step too."""
    model = _model("int8")
    before, _, _ = _fused_and_plain(model, monkeypatch)
    rotary = model.model.rotary_emb
    rotary.theta = 50.0
    rotary.cos_cached = rotary.sin_cached = None  # rebuilt on the next forward
    fused, plain, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 7 and torch.equal(fused, plain)
    assert not torch.equal(fused, before)


@pytest.mark.parametrize("adopt", [True, False], ids=["rebinds", "copies"])
def test_reloaded_weights_stay_bit_identical(adopt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_weights(adopt=True)` rebinds each parameter's storage (the plan is rebuilt);
    without adopt it copies in place (the plan reads the same memory)."""
    model = _model("int4-g32")
    before, _, _ = _fused_and_plain(model, monkeypatch)
    g = torch.Generator().manual_seed(11)
    new = [
        (name, torch.rand(p.shape, generator=g) + 0.5)
        for name, p in model.named_parameters()
        if name.endswith("layernorm.weight") or name == "model.norm.weight"
    ]
    old_plan = decode_step.plan_for(model.model)
    loaded = model.load_weights(iter(new), adopt=adopt)
    assert loaded == {n for n, _ in new}
    fused, plain, ran = _fused_and_plain(model, monkeypatch)
    assert ran == 7 and torch.equal(fused, plain)
    assert not torch.equal(fused, before)
    assert (decode_step.plan_for(model.model) is old_plan) == (not adopt)
