"""Quantized linears: quantization error, kernel layout, and fast paths vs the fp32 reference.

Stated bounds (y = x Wq^T with Wq the dequantized weight, |x| |Wq|^T the elementwise-abs product):
- large-M path (dequantize + fp32 GEMM): |y - y_ref| <= 1e-5 * (|x| |Wq|^T) + 1e-6 — fp32 rounding only;
- small-M path, torch kernels (bf16 activations, bf16 output):
  |y - y_ref| <= 2^-8 * (|x| |Wq|^T + |y_ref|) + 1e-6
  — one bf16 rounding of each x_i (relative 2^-9) and one of each y_j (relative 2^-9), doubled;
- small-M path, qwenkit's AVX2 kernels (int8 activations in blocks of 32, scale d_b = max|x_b| / 127,
  so |x_i - x̂_i| <= d_b / 2): |y - y_ref| <= (d/2) |Wq|^T * (1 + 1e-3) + the large-M bound — the
  activation rounding propagated exactly; separately, the kernels equal the fp32 product of the
  dequantized x̂ and Wq to 1e-5 relative (`test_q_kernels_equal_their_math`).
- quantization itself: int8 |w - wq| <= scale/2 per row; int4 |w - wq| <= scale/2 per group.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenkit.model.layers import MergedLinear
from qwenkit.cpu import cgemv
from qwenkit.quant import kernels
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    q, s, z = quantize_int4_groupwise(w, group, search=False)
    err = (dequantize_int4(q, s, z) - w).abs().view(96, 256 // group, group)
    # codes clamp to [0, 15]; bf16 rounding of the zero moves the grid by < 2^-8 |z|
    bound = s[..., None] / 2 + z.abs()[..., None] * 2**-8 + 1e-7
    assert bool((err <= bound * (1 + 1e-3)).all())
    assert int(unpack_int4(q).max()) <= 15


@pytest.mark.parametrize("group", [32, 128])
def test_int4_search_never_loses_to_min_max(group: int) -> None:
    """The least-squares search keeps min/max as a candidate, so per group its squared error is
    never larger, and on weights with outliers it is clearly smaller overall."""
    w = _weight(96, 256, seed=7)
    w += torch.randn(96, 256, generator=torch.Generator().manual_seed(8)).pow(3) * 0.01  # heavy tails
    base = (dequantize_int4(*quantize_int4_groupwise(w, group, search=False)) - w).pow(2)
    best = (dequantize_int4(*quantize_int4_groupwise(w, group)) - w).pow(2)
    per_group = lambda e: e.view(96, 256 // group, group).sum(-1)  # noqa: E731
    assert bool((per_group(best) <= per_group(base) * (1 + 1e-6) + 1e-12).all())
    assert float(best.sum()) < 0.95 * float(base.sum())
    q, s, z = quantize_int4_groupwise(w, group)
    assert int(unpack_int4(q).max()) <= 15 and torch.equal(s, s.to(torch.bfloat16).float())
    assert torch.equal(z, z.to(torch.bfloat16).float())


def test_int4_cpu_layout_round_trips() -> None:
    w = _weight(128, 256)
    q, s, z = quantize_int4_groupwise(w, 32)
    packed = kernels.Int4Weight.from_canonical(q, s, z, 32)
    q2, s2, z2 = packed.to_canonical()
    assert torch.equal(q2, q)
    assert torch.equal(s2.float(), s) and torch.equal(z2.float(), z)
    assert torch.equal(packed.dequantize(), dequantize_int4(q, s, z))
    assert torch.equal(packed.dequantize(32, 96), dequantize_int4(q, s, z)[32:96])


def _act_half_step(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Per element, half the step of its activation block as `kernel` quantizes it (the
    activation rounding bound); a row's last block may be shorter."""
    qmax, blk = cgemv.act_format(kernel)
    out = torch.empty_like(x)
    for c0 in range(0, x.shape[-1], blk):
        xb = x[..., c0 : c0 + blk]
        out[..., c0 : c0 + blk] = (xb.abs().amax(-1, keepdim=True) / qmax / 2).expand_as(xb)
    return out


def _dequant_acts(xq: torch.Tensor, dx: torch.Tensor, blk: int) -> torch.Tensor:
    """codes (M, K) * their block's scale (M, ceil(K / blk))."""
    return xq.float() * dx.repeat_interleave(blk, -1)[:, : xq.shape[1]]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", [*FORMATS, "int8-torch", "int4-g32-torch"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_fast_paths_match_reference(fmt: str, shape: tuple[int, int], m: int, monkeypatch) -> None:
    """The small-M path runs the AVX2 C kernels when they build; "-torch" forces torch's bf16 kernels."""
    torch_kernels = fmt.endswith("-torch")
    if torch_kernels:
        monkeypatch.setattr(cgemv, "available", lambda: False)
        fmt = fmt.removesuffix("-torch")
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
        large_bound = fp32_bound
        if cgemv.available() and cgemv.supports_q(k, None if fmt == "int8" else int(fmt.removeprefix("int4-g"))):
            kernel = "q8" if fmt == "int8" else "q4"
            small_bound = _act_half_step(x, kernel) @ wq.abs().t() * (1 + 1e-3) + fp32_bound
            large_bound = small_bound  # the int8-activation kernels run at every M
        else:
            small_bound = 2**-8 * (scale + ref.abs())
        for small_m, bound in ((10_000, small_bound), (0, large_bound)):
            qlin.small_m = small_m  # force the small-M or the large-M kernel
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


@pytest.mark.parametrize("k", [128, 224, 896, 4864])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17])
def test_q_kernels_equal_their_math(m: int, k: int) -> None:
    """int8-activation kernels = fp32 product of the dequantized activations and weights
    (every M around the 4-row blocking, K with an odd number of 8-group chunks, K = 224 with a
    short last int8 activation block, g32 and g128)."""
    if not cgemv.available():
        pytest.skip("no C compiler / AVX2")
    w = _weight(72, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3

    def dequantized_activations(kernel: str) -> torch.Tensor:
        qmax, blk = cgemv.act_format(kernel)
        xq, dx, xs = cgemv.quantize_activations(x, kernel)
        assert dx.shape == xs.shape == (m, -(-k // blk))
        assert int(xq.abs().max()) == qmax  # each block's largest element takes the top code
        xd = _dequant_acts(xq, dx, blk)
        # half a step, plus the fp32 roundings of the scale and of x * (1 / scale) at a tie
        assert bool(((xd - x).abs() <= _act_half_step(x, kernel) * (1 + 1e-6) + 2**-21 * x.abs()).all())
        bsum = torch.stack([xd[:, c0 : c0 + blk].sum(-1) for c0 in range(0, k, blk)], -1)
        babs = torch.stack([xd[:, c0 : c0 + blk].abs().sum(-1) for c0 in range(0, k, blk)], -1)
        assert bool(((xs - bsum).abs() <= 1e-6 * babs + 1e-7).all())  # fp32 summation order
        return xd

    xd = dequantized_activations("q8")
    q, s = quantize_int8_per_channel(w)
    wd = dequantize_int8(q, s)
    want = xd @ wd.t()
    # the kernel sums <w + 128, x> and subtracts 128 * sum(x) per row: fp32 rounding of terms
    # up to |w| + 128 in size (w = q * s), hence the second term of the bound
    tol = 1e-5 * (xd.abs() @ (wd.abs() + 128 * s[:, None]).t()) + 1e-6
    got = cgemv.gemm_q8(x, cgemv.pack_q8(q), s)
    assert bool(((got - want).abs() <= tol).all()), (got - want).abs().max()
    if k % 64:  # the int4 kernel takes pairs of 32-column blocks
        return
    xd = dequantized_activations("q4")
    for g in (32, 128):
        q4, s4, z4 = quantize_int4_groupwise(w, g)
        blk = kernels.BlockInt4Weight.from_canonical(q4, s4, z4, g)
        wq = dequantize_int4(q4, s4, z4)
        want = xd @ wq.t()
        tol = 1e-5 * (xd.abs() @ (wq.abs() + z4.abs().repeat_interleave(g, 1)).t()) + 1e-6
        assert bool(((blk.mm_q(x) - want).abs() <= tol).all()), (g, (blk.mm_q(x) - want).abs().max())


def test_q_kernels_are_batch_invariant() -> None:
    """A row's result is bit-identical whatever M is and wherever the row sits in the batch, so
    a request's tokens do not depend on what else the engine batches with it."""
    if not cgemv.available():
        pytest.skip("no C compiler / AVX2")
    w = _weight(80, 896, seed=3)
    x = torch.randn(11, 896, generator=torch.Generator().manual_seed(4))
    q, s = quantize_int8_per_channel(w)
    blk = kernels.BlockInt4Weight.from_canonical(*quantize_int4_groupwise(w, 32), 32)
    qt = cgemv.pack_q8(q)
    for fn in (lambda t: cgemv.gemm_q8(t, qt, s), blk.mm_q):
        full = fn(x)
        for i in (0, 3, 4, 10):
            assert torch.equal(fn(x[i : i + 1]), full[i : i + 1])
        assert torch.equal(fn(x[5:11]), full[5:11])
    # int8 at prefill sizes: rows in several 64-row chunks, an odd number of output rows (the
    # kernel's 2-row weight tiles end in a 1-row tile)
    q, s = quantize_int8_per_channel(_weight(81, 896, seed=6))
    qt = cgemv.pack_q8(q)
    x = torch.randn(150, 896, generator=torch.Generator().manual_seed(7))
    full = cgemv.gemm_q8(x, qt, s)
    for i in (0, 63, 64, 130, 149):
        assert torch.equal(cgemv.gemm_q8(x[i : i + 1], qt, s), full[i : i + 1])
    assert torch.equal(cgemv.gemm_q8(x[60:140], qt, s), full[60:140])


def test_q_kernels_add_the_bias_as_torch_would() -> None:
    """The bias is added in the kernels' epilogue, rounded exactly as ``y + bias``."""
    if not cgemv.available():
        pytest.skip("no C compiler / AVX2")
    g = torch.Generator().manual_seed(5)
    w = _weight(72, 256, seed=5)
    x = torch.randn(6, 256, generator=g)
    bias = torch.randn(72, generator=g)
    q, s = quantize_int8_per_channel(w)
    blk = kernels.BlockInt4Weight.from_canonical(*quantize_int4_groupwise(w, 32), 32)
    qt = cgemv.pack_q8(q)
    assert torch.equal(cgemv.gemm_q8(x, qt, s, bias), cgemv.gemm_q8(x, qt, s) + bias)
    assert torch.equal(
        cgemv.gemm_q4(x, blk.codes, blk.scales, blk.zeros, 32, bias),
        cgemv.gemm_q4(x, blk.codes, blk.scales, blk.zeros, 32) + bias,
    )


def test_block_int4_layout_round_trips() -> None:
    w = _weight(96, 256)
    q, s, z = quantize_int4_groupwise(w, 32)
    blk = kernels.BlockInt4Weight.from_canonical(q, s, z, 32)
    q2, s2, z2 = blk.to_canonical()
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    assert torch.equal(blk.dequantize(), dequantize_int4(q, s, z))
    assert torch.equal(blk.dequantize(32, 96), dequantize_int4(q, s, z)[32:96])
    # byte j of a 64-column pair holds columns j (low nibble) and j + 32 (high nibble)
    codes = unpack_int4(q)
    assert int(blk.codes[5, 3]) == int(codes[5, 3]) | int(codes[5, 35]) << 4
    assert int(blk.codes[5, 32 + 3]) == int(codes[5, 64 + 3]) | int(codes[5, 96 + 3]) << 4


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


@pytest.mark.parametrize("n", [1, 2, 3, 7, 80, 81])
@pytest.mark.parametrize("nr", [2, 3])
def test_q8_tiles_round_trip_and_look_up_rows(n: int, nr: int) -> None:
    """pack_q8 is a permutation of the bytes (every N, tails of each size), unpack_q8 inverts it,
    and q8_rows finds any row (what a tied int8 embedding looks up) without unpacking."""
    q = torch.randint(-127, 128, (n, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    t = cgemv.pack_q8(q, nr)
    assert t.shape == q.shape and torch.equal(t.flatten().sort().values, q.flatten().sort().values)
    assert torch.equal(cgemv.unpack_q8(t, nr), q)
    ids = torch.tensor([[0, n - 1], [n // 2, n - 1 - (n > 1)]])
    assert torch.equal(cgemv.q8_rows(t, ids, nr), q[ids])
    if n >= nr:  # a full tile: 32 bytes of row 0, then 32 of row 1, ...
        assert torch.equal(t.flatten()[32:64], q[1, :32])
