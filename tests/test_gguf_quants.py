"""Bit-exactness of the torch GGUF dequantizers against ``gguf.quants.dequantize``."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwenkit.loaders import gguf_quants
from qwenkit.loaders.gguf_quants import BLOCK_SIZES, SUPPORTED_TYPES, dequantize

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]

# Byte offsets of the fp16 scale fields (d, m, dmin) inside one block.
FP16_FIELDS: dict[Q, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

# Types gguf.quants can also quantize (for the round-trip test).
QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite fp16 scales: mostly normal values of either sign, plus zeros and subnormals."""
    vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(np.float16)
    kind = rng.integers(0, 20, n)
    vals[kind == 0] = 0
    vals[kind == 1] = (rng.integers(1, 1024, int((kind == 1).sum())).astype(np.uint16)
                       .view(np.float16))  # subnormals
    assert np.isfinite(vals).all()
    return vals


def _random_raw(qtype: Q, n_blocks: int, seed: int) -> np.ndarray:
    """[n_blocks, bytes_per_block] random uint8 blocks with finite fp16 scale fields."""
    rng = np.random.default_rng(seed)
    _, block_bytes = BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = _finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def _reference(raw: np.ndarray, qtype: Q, shape: Sequence[int]) -> torch.Tensor:
    rows = raw.reshape(-1, raw.size // max(1, math.prod(shape[:-1])))  # [rows, bytes per row]
    ref = gguf.quants.dequantize(rows, qtype)
    return torch.from_numpy(np.array(ref, dtype=np.float32)).reshape(tuple(shape))


def _assert_same(got: torch.Tensor, ref: torch.Tensor, *, bitwise: bool = True) -> None:
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    if bitwise:
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
        return
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.masked_fill(nan, 0.0), ref.masked_fill(nan, 0.0))


def test_tables() -> None:
    assert set(SUPPORTED_TYPES) == set(ALL_TYPES)
    for t in ALL_TYPES:
        assert BLOCK_SIZES[t] == gguf.constants.GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: Q) -> None:
    block_elems, _ = BLOCK_SIZES[qtype]
    n_blocks = 3072 if block_elems > 1 else 3072 * 32
    raw = _random_raw(qtype, n_blocks, seed=qtype.value)
    n = n_blocks * block_elems
    # The random F32/F16/BF16 bytes contain NaNs. F16 NaN payload bits depend on how numpy
    # widens halves on the host (software keeps signalling NaNs, F16C quiets them), so
    # there only NaN positions are compared; see test_f16_nan_payloads.
    bitwise = qtype != Q.F16
    for cols in (block_elems * 8, block_elems * 3, block_elems * 64):
        shape = (n // cols, cols)
        _assert_same(dequantize(raw, qtype, shape), _reference(raw, qtype, shape), bitwise=bitwise)
    # flat, and 3-D with a leading batch dim
    _assert_same(dequantize(raw, qtype, (n,)), _reference(raw, qtype, (n,)), bitwise=bitwise)
    shape3 = (4, n // (4 * block_elems * 4), block_elems * 4)
    _assert_same(dequantize(raw, qtype, shape3), _reference(raw, qtype, shape3), bitwise=bitwise)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_chunk_boundaries(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block counts that are not a multiple of the chunk size still cover every block."""
    block_elems, _ = BLOCK_SIZES[qtype]
    monkeypatch.setattr(gguf_quants, "_CHUNK_ELEMENTS", block_elems * 7)
    raw = _random_raw(qtype, 100, seed=1)
    shape = (10, 10 * block_elems)
    _assert_same(dequantize(raw, qtype, shape), _reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_round_trip_matches_reference(qtype: Q) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 512)) * rng.uniform(0.01, 2.0, (64, 1))).astype(np.float32)
    x[3] = 0.0  # all-zero blocks
    raw = gguf.quants.quantize(x, qtype)
    got = dequantize(raw, qtype, x.shape)
    _assert_same(got, _reference(raw, qtype, x.shape))
    assert torch.allclose(got, torch.from_numpy(x), atol=0.5, rtol=0.2)  # sanity: it is x


def test_input_forms() -> None:
    """uint8 2-D reader layout, typed arrays, read-only memmaps and torch tensors all work."""
    raw = _random_raw(Q.Q8_0, 256, seed=3)
    shape = (16, 512)
    ref = _reference(raw, Q.Q8_0, shape)
    ro = raw.reshape(16, -1).copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(dequantize(ro, Q.Q8_0, shape), ref)
    _assert_same(dequantize(torch.from_numpy(raw), Q.Q8_0, shape), ref)
    _assert_same(dequantize(torch.from_numpy(raw).view(torch.int16), Q.Q8_0, shape), ref)

    x = np.random.default_rng(4).standard_normal((8, 24)).astype(np.float32)
    for qtype, typed in ((Q.F32, x), (Q.F16, x.astype(np.float16))):
        got = dequantize(typed, qtype, x.shape)
        _assert_same(got, torch.from_numpy(typed.astype(np.float32)))
    assert dequantize(x, Q.F32, x.shape).data_ptr() != torch.from_numpy(x).data_ptr()  # a copy


def test_f16_nan_payloads() -> None:
    """Halves widen like IEEE/numpy's software path: sign, payload and sNaN bit preserved."""
    h = np.array([0x7C01, 0x7E01, 0xFC01, 0xFE00, 0x7D55, 0x7C00, 0xFC00, 0x0001, 0x8000],
                 dtype=np.uint16)
    want = np.array([0x7F802000, 0x7FC02000, 0xFF802000, 0xFFC00000, 0x7FAAA000,
                     0x7F800000, 0xFF800000, 0x33800000, 0x80000000], dtype=np.uint32)
    for reps in (1, 4096):  # scalar and vectorized torch paths
        got = dequantize(np.tile(h, reps), Q.F16, (reps * len(h),))
        expected = torch.from_numpy(np.tile(want, reps).view(np.int32))
        assert torch.equal(got.view(torch.int32), expected)


def test_empty_tensor() -> None:
    out = dequantize(np.zeros(0, dtype=np.uint8), Q.Q4_K, (0, 256))
    assert out.shape == (0, 256) and out.dtype == torch.float32


def test_wrong_byte_count() -> None:
    raw = _random_raw(Q.Q8_0, 100, seed=5).reshape(-1)  # 3400 bytes = 100 blocks
    with pytest.raises(ValueError, match=r"expected 3400 bytes.*got 3399"):
        dequantize(raw[:-1], Q.Q8_0, (10, 320))
    with pytest.raises(ValueError, match=r"expected 3434 bytes.*got 3400"):
        dequantize(raw, Q.Q8_0, (101, 32))
    with pytest.raises(ValueError, match=r"expected 400 bytes.*got 396"):
        dequantize(np.zeros(99, dtype=np.float32), Q.F32, (10, 10))


def test_bad_shape() -> None:
    with pytest.raises(ValueError, match="block size 256"):
        dequantize(np.zeros(144, dtype=np.uint8), Q.Q4_K, (2, 128))


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.Q8_1, Q.TQ1_0, Q.I8], ids=lambda t: t.name)
def test_unsupported_type(qtype: Q) -> None:
    with pytest.raises(ValueError, match=qtype.name):
        dequantize(np.zeros(1024, dtype=np.uint8), qtype, (1, 256))


def test_invalid_type_value() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        dequantize(np.zeros(4, dtype=np.uint8), 12345, (1,))  # type: ignore[arg-type]


# --- real model -------------------------------------------------------------------------------

MAX_ROWS = 1024  # per tensor, to keep memory and reference time modest


# slow: the dequantization itself takes well under a second, but gguf.GGUFReader spends
# 11 s (idle machine) to 50 s (shared, loaded machine) parsing the 151k-entry tokenizer arrays.
@pytest.mark.slow
def test_real_tensors_match_reference(gguf_05b_path: Path) -> None:
    reader = gguf.GGUFReader(gguf_05b_path)
    smallest: dict[Q, gguf.ReaderTensor] = {}
    for t in reader.tensors:
        best = smallest.get(t.tensor_type)
        if best is None or int(t.n_elements) < int(best.n_elements):
            smallest[t.tensor_type] = t
    expected_types = {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}
    assert expected_types <= set(smallest)
    for qtype in sorted(set(smallest) & SUPPORTED_TYPES, key=lambda q: q.value):
        t = smallest[qtype]
        shape = [int(s) for s in reversed(t.shape)]  # PyTorch order: (rows, cols)
        data = t.data
        if len(shape) > 1 and shape[0] > MAX_ROWS:
            shape[0] = MAX_ROWS
            data = data[:MAX_ROWS]
        got = dequantize(data, qtype, shape)
        _assert_same(got, _reference(np.asarray(data), qtype, shape))
        assert torch.isfinite(got).all(), t.name
