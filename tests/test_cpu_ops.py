"""qwenkit.cpu.ops (fused C ops of CPU inference) against the torch expressions they replace.

Tolerances: RoPE is bit-exact (same two products and one sum per element); RMSNorm and the
softmax of attention sum in another order than torch (a few ulp: rtol 1e-6 / 2e-6); SiLU uses
its own vectorized exp (Cephes polynomial, ~1 ulp: rtol 1e-6 relative to the output scale).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenkit import cpu
from qwenkit.cpu import ops
from qwenkit.engine.contiguous_cache import ContiguousKVCache
from qwenkit.model.layers import rotate
from tests.tiny import make_hf_and_ours

pytestmark = pytest.mark.skipif(ops._lib() is None, reason="no C compiler / AVX2: ops not built")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rms_norm_matches_hf_formula() -> None:
    g = _gen(0)
    x = torch.randn(5, 896, generator=g) * 3
    x[1] *= 1e-3  # small-norm row
    w = torch.randn(896, generator=g)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    # leading dims and odd widths (scalar tail)
    x3 = torch.randn(2, 3, 77, generator=g)
    w3 = torch.randn(77, generator=g)
    want3 = w3 * (x3 * torch.rsqrt(x3.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(ops.rms_norm(x3, w3, 1e-5), want3, rtol=1e-6, atol=1e-6)


def test_silu_and_mul_matches_torch() -> None:
    g = _gen(1)
    i = 4864
    gu = torch.randn(3, 2 * i + 0, generator=g) * 4
    gu[0, :12] = torch.tensor([-120.0, -88.0, -87.0, -50.0, -1e-3, 0.0, 1e-30, 1e-3, 50.0, 87.0, 88.0, 120.0])
    want = F.silu(gu[:, :i]) * gu[:, i:]
    got = ops.silu_and_mul(gu)
    assert got.shape == (3, i)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    odd = torch.randn(2, 2 * 13, generator=g)  # scalar tail only
    torch.testing.assert_close(ops.silu_and_mul(odd), F.silu(odd[:, :13]) * odd[:, 13:], rtol=1e-6, atol=1e-30)


def test_rope_in_place_is_bit_exact() -> None:
    g = _gen(2)
    b, t, hq, hkv, d = 2, 5, 14, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g)
    cos = torch.randn(b, t, 1, d, generator=g)
    sin = torch.randn(b, t, 1, d, generator=g)
    want = rotate(qkv[..., : (hq + hkv) * d].reshape(b, t, hq + hkv, d), cos, sin)
    got = qkv.clone()
    assert ops.rope_(got, cos, sin, hq + hkv, d)
    assert torch.equal(got[..., : (hq + hkv) * d].reshape(b, t, hq + hkv, d), want)
    assert torch.equal(got[..., (hq + hkv) * d :], qkv[..., (hq + hkv) * d :])  # v untouched
    # a layout it cannot take: refused, nothing written
    strided = qkv.clone().transpose(0, 1)
    before = strided.clone()
    assert not ops.rope_(strided, cos, sin, hq + hkv, d)
    assert torch.equal(strided, before)


def _reference_decode(q, k_pool, v_pool, tables, ctx, scale):
    outs = []
    for s in range(q.shape[0]):
        n = int(ctx[s])
        k = k_pool[tables[s]].flatten(0, 1)[:n].transpose(0, 1)  # (Hkv, n, D)
        v = v_pool[tables[s]].flatten(0, 1)[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[s][:, None], k, v, scale=scale, enable_gqa=True)
        outs.append(o[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (4, 4, 128), (12, 2, 128)])
def test_decode_attention_paged_matches_sdpa(hq: int, hkv: int, d: int) -> None:
    g = _gen(3)
    bs, blocks = 16, 40
    k_pool = torch.randn(blocks, bs, hkv, d, generator=g)
    v_pool = torch.randn(blocks, bs, hkv, d, generator=g)
    ctx = torch.tensor([1, 16, 37, 130])  # one key, a full block, partial blocks
    tables = torch.randperm(blocks, generator=g)[: 4 * 9].view(4, 9)
    qkv_rows = torch.randn(4, (hq + 2 * hkv) * d, generator=g)  # q as a strided view, as in the model
    q = qkv_rows[:, : hq * d].view(4, hq, d)
    got = ops.decode_attention(q, k_pool, v_pool, tables, ctx, scale=d**-0.5)
    want = _reference_decode(q, k_pool, v_pool, tables, ctx, d**-0.5)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (4, 4, 64)])
def test_paged_attention_matches_sdpa_and_decode_rows(hq: int, hkv: int, d: int) -> None:
    """Every row of a step (prefill chunks after cached keys, decodes) over the paged pool ==
    causal SDPA within fp32 rounding, and bit-identical to that row run alone as a decode."""
    g = _gen(5)
    bs, blocks = 16, 64
    k_pool = torch.randn(blocks, bs, hkv, d, generator=g)
    v_pool = torch.randn(blocks, bs, hkv, d, generator=g)
    qlen = torch.tensor([1, 37, 9, 1, 20])  # decode, prefill from 0, chunk after cached keys, ...
    ctx = torch.tensor([5, 37, 70, 16, 53])
    tables = torch.randperm(blocks, generator=g)[: 5 * 5].view(5, 5)
    n = int(qlen.sum())
    qkv_rows = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    q = qkv_rows[:, : hq * d].view(n, hq, d)  # a strided view, as in the model
    got = ops.paged_attention(q, k_pool, v_pool, tables, ctx, qlen, scale=d**-0.5)
    seq = torch.repeat_interleave(torch.arange(5), qlen)
    first = torch.cumsum(qlen, 0) - qlen
    pos = (ctx - qlen)[seq] + torch.arange(n) - first[seq]
    alone = ops.decode_attention(q, k_pool, v_pool, tables[seq], pos + 1, scale=d**-0.5)
    assert torch.equal(got, alone)
    want = _reference_decode(q, k_pool, v_pool, tables[seq], pos + 1, d**-0.5)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_decode_attention_refuses_other_head_dims() -> None:
    q = torch.randn(1, 4, 16)
    kv = torch.randn(1, 8, 2, 16)
    assert ops.decode_attention(q, kv, kv, torch.zeros(1, 1, dtype=torch.long), torch.tensor([8]), scale=0.25) is None


def test_enabled_only_for_cpu_fp32_inference() -> None:
    x = torch.randn(4)
    w = torch.nn.Parameter(torch.randn(4))
    assert ops.enabled(x)
    assert not ops.enabled(x.to(torch.bfloat16))
    assert not ops.enabled(x, w)  # autograd would need the graph: torch path
    with torch.no_grad():
        assert ops.enabled(x, w)
    with torch.inference_mode():
        assert ops.enabled(x, w)


def test_model_decode_fused_equals_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model with head_dim 64 (so the decode attention kernel runs): prefill + decode
    through the contiguous cache with the fused ops == the torch expressions == transformers."""
    ref, ours = make_hf_and_ours(seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    cpu.install(ours)
    cfg = ours.config
    assert cfg.head_dim == 64
    ids = torch.randint(0, 256, (2, 14), generator=_gen(8))

    def run() -> torch.Tensor:
        cache = ContiguousKVCache(cfg.num_hidden_layers, 2, 16, cfg.num_key_value_heads, cfg.head_dim)
        with torch.inference_mode():
            cache.begin(9)
            steps = [ours(ids[:, :9], torch.arange(9).expand(2, 9), cache)]
            for t in range(9, 14):
                cache.begin(1)
                steps.append(ours(ids[:, t : t + 1], torch.full((2, 1), t), cache))
        return torch.cat(steps, dim=1)

    calls = {"attn": 0}
    real = ops.decode_attention

    def counting(*a, **k):
        calls["attn"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ops, "decode_attention", counting)
    fused = run()
    assert calls["attn"] == 5 * cfg.num_hidden_layers  # every decode step of every layer
    monkeypatch.setattr(ops, "enabled", lambda *t: False)
    plain = run()
    with torch.no_grad():
        want = ref(ids).logits
    scale = want.abs().max().item()
    assert (fused - plain).abs().max().item() <= 1e-5 * scale
    assert (fused - want).abs().max().item() <= 1e-5 * scale
