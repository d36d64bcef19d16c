"""Quantized linears: quantization error, kernel layout, and fast paths vs the fp32 reference.

Stated bounds (y = x Wq^T with Wq the dequantized weight, |x| |Wq|^T the elementwise-abs product):
- large-M path (dequantize + fp32 GEMM): |y - y_ref| <= 1e-5 * (|x| |Wq|^T) + 1e-6 — fp32 rounding only;
- small-M path, torch kernels (bf16 activations, bf16 output):
  |y - y_ref| <= 2^-8 * (|x| |Wq|^T + |y_ref|) + 1e-6
  — one bf16 rounding of each x_i (relative 2^-9) and one of each y_j (relative 2^-9), doubled;
- small-M path, qwenkit's AVX2 int8 kernel (fp32 throughout): the large-M bound.
- quantization itself: int8 |w - wq| <= scale/2 per row; int4 |w - wq| <= scale/2 per group.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenkit.model.layers import MergedLinear
from qwenkit.quant import cgemv, kernels
from qwenkit.quant.linear import Int4Linear, Int8Linear
from qwenkit.quant.numerics import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    unpack_int4,
)

# (N, K): small shapes plus the real 0.5B qkv and down projections
SHAPES = [(64, 128), (1152, 896), (896, 4864)]
FORMATS = ["int8", "int4-g32", "int4-g128"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, :3] *= 20  # outlier input channels, as in real checkpoints
    return w


def _make(fmt: str, linear: nn.Linear) -> Int8Linear | Int4Linear:
    if fmt == "int8":
        return Int8Linear.from_float(linear)
    return Int4Linear.from_float(linear, int(fmt.removeprefix("int4-g")))


def test_int8_quantization_error_bound() -> None:
    w = _weight(96, 256)
    q, s = quantize_int8_per_channel(w)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-3) + 1e-8).all())
    assert torch.equal(s, s.to(torch.bfloat16).float())  # bf16-exact scales


@pytest.mark.parametrize("group", [32, 128])
def test_int4_quantization_error_bound(group: int) -> None:
    w = _weight(96, 256)
    q, s, z = quantize_int4_groupwise(w, group)
    err = (dequantize_int4(q, s, z) - w).abs().view(96, 256 // group, group)
    # codes clamp to [0, 15]; bf16 rounding of the zero moves the grid by < 2^-8 |z|
    bound = s[..., None] / 2 + z.abs()[..., None] * 2**-8 + 1e-7
    assert bool((err <= bound * (1 + 1e-3)).all())
    assert int(unpack_int4(q).max()) <= 15


def test_int4_cpu_layout_round_trips() -> None:
    w = _weight(128, 256)
    q, s, z = quantize_int4_groupwise(w, 32)
    packed = kernels.Int4Weight.from_canonical(q, s, z, 32)
    q2, s2, z2 = packed.to_canonical()
    assert torch.equal(q2, q)
    assert torch.equal(s2.float(), s) and torch.equal(z2.float(), z)
    assert torch.equal(packed.dequantize(), dequantize_int4(q, s, z))
    assert torch.equal(packed.dequantize(32, 96), dequantize_int4(q, s, z)[32:96])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", [*FORMATS, "int8-torch"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_fast_paths_match_reference(fmt: str, shape: tuple[int, int], m: int, monkeypatch) -> None:
    """int8 runs the AVX2 C kernel when it builds; "int8-torch" forces torch's bf16 kernel."""
    if fmt == "int8-torch":
        monkeypatch.setattr(cgemv, "available", lambda: False)
        fmt = "int8"
    n, k = shape
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_weight(n, k))
        linear.bias.normal_()
    qlin = _make(fmt, linear).eval()
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m))
    wq = qlin.dequantize()
    with torch.no_grad():
        ref = qlin.reference_forward(x)
        scale = x.abs() @ wq.abs().t()  # (2, m, N)
        fp32_bound = 1e-5 * scale
        small_bound = fp32_bound if (fmt == "int8" and cgemv.available()) else 2**-8 * (scale + ref.abs())
        for small_m, bound in ((10_000, small_bound), (0, fp32_bound)):
            qlin.small_m = small_m  # force the small-M (bf16) or the large-M (fp32) kernel
            got = qlin(x)
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert bool(((got - ref).abs() <= bound + 1e-6).all()), (small_m, (got - ref).abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_linear_metadata_survives(fmt: str) -> None:
    lin = MergedLinear(128, [64, 32, 32], ("q_proj", "k_proj", "v_proj"), bias=True)
    q = _make(fmt, lin)
    assert q.output_sizes == (64, 32, 32)
    assert q.shard_names == ("q_proj", "k_proj", "v_proj")
    assert set(q.canonical_state()) >= {"qweight", "scales"}


def test_c_kernel_handles_ragged_k_and_many_rows() -> None:
    if not cgemv.available():
        pytest.skip("no C compiler / AVX2")
    w = _weight(40, 75)  # K not a multiple of 32: scalar tail; M=6: one full + one partial block
    q, s = quantize_int8_per_channel(w)
    x = torch.randn(6, 75)
    bias = torch.randn(40)
    want = x @ dequantize_int8(q, s).t() + bias
    torch.testing.assert_close(cgemv.gemm_int8(x, q, s, bias), want, rtol=1e-5, atol=1e-5)


def test_large_m_chunking_covers_every_row() -> None:
    """Chunked dequantization (rows > one chunk) equals one full dequantize + GEMM."""
    n, k = 4096, 1024  # 4096 rows x 1024 x 4 B = 16 MB > DEQUANT_CHUNK_BYTES
    w = _weight(n, k)
    x = torch.randn(33, k)
    q, s = quantize_int8_per_channel(w)
    p8 = kernels.Int8Weight.from_canonical(q, s)
    torch.testing.assert_close(p8.mm_dequant_fp32(x), x @ dequantize_int8(q, s).t(), rtol=1e-5, atol=1e-5)
    q4, s4, z4 = quantize_int4_groupwise(w, 128)
    p4 = kernels.Int4Weight.from_canonical(q4, s4, z4, 128)
    torch.testing.assert_close(p4.mm_dequant_fp32(x), x @ dequantize_int4(q4, s4, z4).t(), rtol=1e-5, atol=1e-5)
