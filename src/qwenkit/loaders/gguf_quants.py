"""Vectorized PyTorch dequantization of GGUF/GGML tensor data.

Bit-exact with ``gguf.quants.dequantize`` (same float32 operation order). Every quantized
type stores a row as consecutive fixed-size blocks; ``fp16`` below is a little-endian
IEEE half, byte offsets are within one block.

Simple blocks (32 elements; element ``j`` of a block comes from nibble/byte ``j``):

- ``Q8_0`` (34 B): ``d:fp16 | qs:int8[32]``;                    ``y = qs * d``
- ``Q4_0`` (18 B): ``d:fp16 | qs:u8[16]``;                      ``y = d * (q - 8)``
- ``Q4_1`` (20 B): ``d:fp16 | m:fp16 | qs:u8[16]``;             ``y = d * q + m``
- ``Q5_0`` (22 B): ``d:fp16 | qh:u32 | qs:u8[16]``;             ``y = d * (q - 16)``
- ``Q5_1`` (24 B): ``d:fp16 | m:fp16 | qh:u32 | qs:u8[16]``;    ``y = d * q + m``

  4-bit values: elements 0..15 are the low nibbles of ``qs``, 16..31 the high nibbles;
  for Q5 bit ``j`` of ``qh`` is bit 4 of element ``j``.

K-quant super-blocks (256 elements):

- ``Q2_K`` (84 B): ``scales:u8[16] | qs:u8[64] | d:fp16 | dmin:fp16``; 16 sub-blocks of 16,
  ``y = (d * (sc & 15)) * q - dmin * (sc >> 4)``; element ``128h + 32s + l`` is bits
  ``2s..2s+1`` of ``qs[32h + l]``.
- ``Q3_K`` (110 B): ``hmask:u8[32] | qs:u8[64] | scales:u8[12] | d:fp16``; 16 sub-blocks of 16
  with 6-bit signed scales (low nibbles in bytes 0..7, 2-bit highs in 8..11, minus 32),
  ``y = (d * sc) * (ql - 4 * !hbit)``; low bits as in Q2_K, ``hbit`` of element ``32j + l``
  is bit ``j`` of ``hmask[l]``.
- ``Q4_K`` (144 B): ``d:fp16 | dmin:fp16 | scales:u8[12] | qs:u8[128]``; 8 sub-blocks of 32
  with 6-bit scales/mins, ``y = (d * sc) * q - dmin * m``; sub-block ``2c + k`` is nibble
  ``k`` of ``qs[32c : 32c + 32]``.
- ``Q5_K`` (176 B): ``d | dmin | scales:u8[12] | qh:u8[32] | qs:u8[128]``; as Q4_K plus bit 4
  of sub-block ``j`` element ``l`` = bit ``j`` of ``qh[l]``.
- ``Q6_K`` (210 B): ``ql:u8[128] | qh:u8[64] | scales:int8[16] | d:fp16``; 16 sub-blocks of 16,
  ``y = (d * sc) * (q - 32)``; element ``128h + 64k + l`` has low nibble ``k`` of
  ``ql[64h + l]``, element ``128h + 32s + l`` has high bits ``2s..2s+1`` of ``qh[32h + l]``.

Plain types: ``F32``, ``F16`` (widened), ``BF16`` (bits shifted into the float32 high half).

Work is done per chunk of blocks (4M elements) straight into the preallocated output, so
temporaries stay at a few tens of MB whatever the tensor size.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

__all__ = ["BLOCK_SIZES", "SUPPORTED_TYPES", "dequantize"]

logger = logging.getLogger(__name__)

_Q = GGMLQuantizationType

# Elements per output chunk: per-chunk temporaries stay around 4-16 MB (uint8 bit fields,
# int64 LUT rows), while chunks are big enough that per-op overhead and intra-op thread
# synchronisation are amortised.
_CHUNK_ELEMENTS = 1 << 22

_Kernel = Callable[[torch.Tensor, torch.Tensor], None]


def _bit_lut(zero: int, one: int) -> torch.Tensor:
    """[256] int64 table: byte ``k`` of entry ``v`` is ``one`` if bit ``k`` of ``v`` is set,
    else ``zero``."""
    v = np.arange(256, dtype=np.uint64)[:, None]
    k = np.arange(8, dtype=np.uint64)[None, :]
    bytes_ = np.where((v >> k) & np.uint64(1), np.uint64(one), np.uint64(zero))  # [256, 8]
    lut = (bytes_ << (np.uint64(8) * k)).sum(axis=1, dtype=np.uint64)
    return torch.from_numpy(lut.view(np.int64))


# Bit j of a qh byte -> byte j of the int64: Q5_1 wants 0/16, Q5_0 folds in its -16 offset
# (0xF0 | nibble == nibble - 16 as int8).
_QH_LUT_Q5_1 = _bit_lut(0x00, 0x10)
_QH_LUT_Q5_0 = _bit_lut(0xF0, 0x00)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """fp16 field at byte ``offset`` of each block, widened to float32: [nb, 1]."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


def _unpack(x: torch.Tensor, width: int, shifts: Sequence[int], mask: int) -> torch.Tensor:
    """Split bytes into bit fields: [nb, g * width] -> [nb, g, len(shifts), width].

    ``out[:, c, i, l] = (x[:, c * width + l] >> shifts[i]) & mask``.
    """
    nb = x.shape[0]
    x = x.reshape(nb, -1, width)  # [nb, g, width]
    out = torch.empty(nb, x.shape[1], len(shifts), width, dtype=torch.uint8)
    for i, s in enumerate(shifts):
        torch.bitwise_right_shift(x, s, out=out[:, :, i])
    out &= mask
    return out


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """[nb, g * width] -> [nb, g, 2, width]: low nibbles, then high nibbles, per group."""
    return _unpack(qs, width, (0, 4), 0x0F)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[nb, g * 32] -> [nb, g, 4, 32] 2-bit fields (bits 0-1 first)."""
    return _unpack(qs, 32, (0, 2, 4, 6), 0x03)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[nb, 32] -> [nb, 8, 32]: ``[:, j, l]`` is bit ``j`` of ``qh[:, l]``."""
    # [nb, 1, 8, 32] -> [nb, 8, 32]
    return _unpack(qh, 32, range(8), 0x01).reshape(qh.shape[0], 8, 32)


def _mul_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """``out = float32(q) * scale`` (integer -> float32 is exact, so one rounding, like numpy).

    Widening into ``out`` first and scaling in place is ~2x faster than a mixed-dtype mul.
    """
    out.copy_(q)
    out.mul_(scale)


# --- legacy 32-element blocks --------------------------------------------------------------


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)
    _mul_into(out, blocks[:, 2:].view(torch.int8), d)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).reshape(nb, 32).view(torch.int8)  # [nb, 32]
    q.sub_(8)
    _mul_into(out, q, d)


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:], 16).reshape(nb, 32)  # [nb, 32]
    _mul_into(out, q, d)
    out.add_(m)


def _q5_q(blocks: torch.Tensor, qh_at: int, lut: torch.Tensor) -> torch.Tensor:
    """5-bit values of Q5_0/Q5_1 blocks as [nb, 32] uint8 (high bit mapped through ``lut``)."""
    nb = blocks.shape[0]
    q = _nibbles(blocks[:, qh_at + 4 :], 16).reshape(nb, 32)  # [nb, 1, 2, 16] -> [nb, 32]
    qh = blocks[:, qh_at : qh_at + 4].reshape(-1).to(torch.int32)  # [nb * 4]
    # [nb * 4] int64 LUT entries -> [nb, 32] bytes; byte i <-> bit i of the little-endian u32
    q |= torch.index_select(lut, 0, qh).view(torch.uint8).reshape(nb, 32)
    return q


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)
    q = _q5_q(blocks, 2, _QH_LUT_Q5_0).view(torch.int8)  # already q - 16
    _mul_into(out, q, d)


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    _mul_into(out, _q5_q(blocks, 4, _QH_LUT_Q5_1), d)
    out.add_(m)


# --- K-quants (256-element super-blocks) ---------------------------------------------------


def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    scales = blocks[:, 0:16]
    d = _f16(blocks, 80)
    dmin = _f16(blocks, 82)
    dl = (d * (scales & 0x0F)).unsqueeze(-1)  # [nb, 16, 1]
    ml = (dmin * (scales >> 4)).unsqueeze(-1)  # [nb, 16, 1]
    q = _crumbs(blocks[:, 16:80]).reshape(nb, 16, 16)  # [nb, 2, 4, 32] -> [nb, 16, 16]
    o = out.view(nb, 16, 16)
    _mul_into(o, q, dl)
    o.sub_(ml)


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    hmask = blocks[:, 0:32]
    sc = blocks[:, 96:108]
    d = _f16(blocks, 108)
    # low nibbles: scale i < 8 from byte i, i >= 8 from byte i - 8 (high nibble)
    lo = _nibbles(sc[:, 0:8], 8).reshape(nb, 16)  # [nb, 1, 2, 8] -> [nb, 16]
    # high 2 bits: scale i from bits 2 * (i // 4) of byte 8 + i % 4
    hi = _unpack(sc[:, 8:12], 4, (0, 2, 4, 6), 0x03).reshape(nb, 16)  # [nb, 1, 4, 4] -> [nb, 16]
    scales = (lo | (hi << 4)).view(torch.int8) - 32  # [nb, 16]
    dl = (d * scales).unsqueeze(-1)  # [nb, 16, 1]
    ql = _crumbs(blocks[:, 32:96]).view(torch.int8)  # [nb, 2, 4, 32]
    hb = _bits(hmask).reshape(nb, 2, 4, 32).view(torch.int8)  # [nb, 8, 32] -> [nb, 2, 4, 32]
    # q = ql - 4 * (1 - hbit) = ql + 4 * hbit - 4
    q = ql.add_(hb << 2).sub_(4).reshape(nb, 16, 16)
    _mul_into(out.view(nb, 16, 16), q, dl)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, 12] packed 6-bit scales/mins of Q4_K/Q5_K -> ([nb, 8], [nb, 8]) uint8."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k4_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    sc, m = _scale_min_k4(blocks[:, 4:16])
    return (d * sc).unsqueeze(-1), (dmin * m).unsqueeze(-1)  # [nb, 8, 1] each


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    dl, ml = _k4_scale(blocks)
    q = _nibbles(blocks[:, 16:144], 32).reshape(nb, 8, 32)  # [nb, 4, 2, 32] -> [nb, 8, 32]
    o = out.view(nb, 8, 32)
    _mul_into(o, q, dl)
    o.sub_(ml)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    dl, ml = _k4_scale(blocks)
    q = _nibbles(blocks[:, 48:176], 32).reshape(nb, 8, 32)  # [nb, 4, 2, 32] -> [nb, 8, 32]
    q |= _bits(blocks[:, 16:48]) << 4
    o = out.view(nb, 8, 32)
    _mul_into(o, q, dl)
    o.sub_(ml)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    nb = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8)
    d = _f16(blocks, 208)
    dl = (d * scales).unsqueeze(-1)  # [nb, 16, 1]
    q = _nibbles(blocks[:, 0:128], 64).reshape(nb, 8, 32)  # [nb, 2, 2, 64] -> [nb, 8, 32]
    q |= _crumbs(blocks[:, 128:192]).reshape(nb, 8, 32) << 4  # [nb, 2, 4, 32] -> [nb, 8, 32]
    qi = q.view(torch.int8).sub_(32).reshape(nb, 16, 16)
    _mul_into(out.view(nb, 16, 16), qi, dl)


# --- plain float types ---------------------------------------------------------------------


def _f16_kernel(blocks: torch.Tensor, out: torch.Tensor) -> None:
    h = blocks.view(torch.int16)  # [nb, 1]
    out.copy_(h.view(torch.float16))
    # torch quiets or canonicalizes NaNs; rebuild them bit-exactly like numpy's widening:
    # sign | all-ones exponent | mantissa << 13 (payload and signalling bit preserved).
    nan = torch.isnan(out)
    if bool(nan.any()):
        hb = h[nan].to(torch.int64) & 0xFFFF
        bits = ((hb & 0x8000) << 16) | 0x7F800000 | ((hb & 0x03FF) << 13)
        out[nan] = bits.to(torch.int32).view(torch.float32)


def _bf16_kernel(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # bf16 -> f32 is a pure 16-bit shift (NaN payloads preserved), like the reference.
    out.copy_(blocks.view(torch.bfloat16))


def _f32_kernel(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))


_KERNELS: dict[GGMLQuantizationType, _Kernel] = {
    _Q.F32: _f32_kernel,
    _Q.F16: _f16_kernel,
    _Q.BF16: _bf16_kernel,
    _Q.Q8_0: _q8_0,
    _Q.Q4_0: _q4_0,
    _Q.Q4_1: _q4_1,
    _Q.Q5_0: _q5_0,
    _Q.Q5_1: _q5_1,
    _Q.Q2_K: _q2_k,
    _Q.Q3_K: _q3_k,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)

# qtype -> (elements per block, bytes per block)
BLOCK_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    t: GGML_QUANT_SIZES[t] for t in _KERNELS
}


def _as_bytes(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Flat uint8 view of ``raw`` (no copy when it is already contiguous)."""
    if isinstance(raw, torch.Tensor):
        t = raw.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dim() == 0:
            t = t.reshape(1)
        return t.contiguous().view(torch.uint8).reshape(-1)
    if isinstance(raw, np.ndarray):
        arr = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():
            # Reader arrays are read-only memmaps; we only ever read from them.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(arr)
    raise TypeError(f"raw must be a torch.Tensor or numpy.ndarray, got {type(raw).__name__}")


def dequantize(
    raw: torch.Tensor | np.ndarray,
    qtype: GGMLQuantizationType,
    shape: Sequence[int],
) -> torch.Tensor:
    """Dequantize GGUF tensor data to a new float32 tensor of ``shape``.

    ``raw`` holds the tensor's bytes (any dtype/shape; reinterpreted as a flat byte buffer),
    ``shape`` is the logical PyTorch-order shape (the reversed GGUF shape), blocks run along
    its last dimension.

    Raises ``ValueError`` for an unsupported ``qtype``, a last dimension that is not a whole
    number of blocks, or a byte count that does not match ``shape``.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unsupported GGML quantization type {qtype!r}") from None
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        raise ValueError(
            f"unsupported GGML quantization type {qtype.name}; "
            f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
        )
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid shape {shape}")
    block_elems, block_bytes = BLOCK_SIZES[qtype]
    n_elements = math.prod(shape)
    if shape and shape[-1] % block_elems != 0:
        raise ValueError(
            f"{qtype.name}: last dimension {shape[-1]} of shape {shape} "
            f"is not a multiple of the block size {block_elems}"
        )
    if not shape and block_elems != 1:
        raise ValueError(f"{qtype.name}: cannot store a scalar in blocks of {block_elems}")
    n_blocks = n_elements // block_elems
    expected = n_blocks * block_bytes

    data = _as_bytes(raw)
    if data.numel() != expected:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape}: expected {expected} bytes, "
            f"got {data.numel()} bytes (truncated or corrupt data?)"
        )

    logger.debug("dequantizing %s tensor of shape %s (%d bytes)", qtype.name, shape, expected)
    out = torch.empty(n_elements, dtype=torch.float32)
    blocks = data.view(n_blocks, block_bytes)  # [n_blocks, bytes_per_block]
    out_blocks = out.view(n_blocks, block_elems)  # [n_blocks, elements_per_block]
    step = max(1, _CHUNK_ELEMENTS // block_elems)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        kernel(blocks[start:stop], out_blocks[start:stop])
    return out.view(shape)
