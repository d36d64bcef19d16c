"""qwenkit's int8-activation GEMM kernels (AVX2 / AVX512-VNNI), compiled at first use, via ctypes.

* `csrc/gemv_avx2.c` — int8 weights x fp32 activations (weights widened in registers).
* `csrc/qgemm_avx2.c` — int8 / int4 weights x int8 activations: x is quantized once per call
  (one fp32 scale per block, as llama.cpp's Q8 activations) and the weights stay int8 / int4
  through integer dot products (`vpdpbusd` with AVX512-VNNI, else `vpmaddubsw` + `vpmaddwd`).
  int8 weights: 8-bit activation codes per block of 128 summed in int32 with VNNI, 7-bit codes
  per 32 on AVX2 (there the weights enter `vpmaddubsw` as unsigned bytes w + 128, whose int16
  pair sums must not saturate); `q8_act_format()` says which. int4: blocks of 32 (the weight group unit),
  8-bit codes.

Why: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` need bf16 activations (two
extra cast passes, bf16 rounding of x and y) and stream the weights well below the memory
bandwidth at M=1, which is what bounds decode, and they fall off quickly as M grows
(`qwenkit bench kernels`).

Built with the rest of qwenkit's C kernels by `qwenkit.cpu.build` (sources in
`qwenkit/cpu/csrc`). Set ``QWENKIT_CKERNELS=0`` to disable them (the torch kernels are used
instead). Without a C compiler or AVX2/FMA, `available()` is False and nothing changes.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from qwenkit.cpu import build

_P = ctypes.c_void_p
_I = ctypes.c_int64


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = build.lib()
    if lib is None:
        return None
    lib.qk_gemm_int8.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I]
    lib.qk_gemm_int8.restype = None
    for fn in (lib.qk_q8_act_max, lib.qk_q8_act_block, lib.qk_q8_tile_rows):
        fn.argtypes = []
        fn.restype = ctypes.c_int64
    for quant in (lib.qk_quant_act_q8, lib.qk_quant_act_q4):
        quant.argtypes = [_P, _P, _P, _P, _I, _I]
        quant.restype = None
    lib.qk_gemm_q8.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I]
    lib.qk_gemm_q8.restype = None
    lib.qk_gemm_q4.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.qk_gemm_q4.restype = None
    return lib


@torch.compiler.assume_constant_result  # a constant for dynamo: no graph break in compiled decode
def available() -> bool:
    return _lib() is not None


def _gemm_int8_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.device.type == "cpu"
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.qk_gemm_int8(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), None, y.data_ptr(), m, n, k)
    return y


_gemm_int8_op = torch.library.custom_op("qwenkit::gemm_int8", mutates_args=())(_gemm_int8_impl)


@_gemm_int8_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def gemm_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32; qweight int8 (N, K), scales fp32 (N,), bias fp32 (N,).

    A registered custom op (`torch.ops.qwenkit.gemm_int8`), so `torch.compile` keeps it in the
    graph instead of breaking on the ctypes call); eager calls skip the op dispatch (~30 us)."""
    y = _gemm_int8_op(x, qweight, scales) if torch.compiler.is_compiling() else _gemm_int8_impl(x, qweight, scales)
    return y if bias is None else y + bias


# ----------------------------------------------------------------- int8-activation kernels
QBLOCK = 32  # the unit of K of qgemm_avx2.c (int4 activation / weight block)
MAX_BLOCKS = 1024  # per-thread scratch of qk_gemm_q4: K <= 32768
Q4_ACT_MAX = 127  # qk_gemm_q4's activation codes: 8 bits (its codes 0..15 are unsigned already)
Q4_ACT_BLOCK = QBLOCK
KERNELS = ("q8", "q4")


@functools.lru_cache(maxsize=1)
def q8_act_format() -> tuple[int, int]:
    """(code range, block) of qk_gemm_q8's activations, fixed in C by the build: (127, 128) with
    AVX512-VNNI, (63, 32) on AVX2 (7 bits: its u8 x s8 pairs cannot saturate)."""
    lib = _lib()
    assert lib is not None
    return int(lib.qk_q8_act_max()), int(lib.qk_q8_act_block())


@functools.lru_cache(maxsize=1)
def q8_tile_rows() -> int:
    """Rows per weight tile of qk_gemm_q8's layout (`pack_q8`): 3 with AVX512-VNNI, 2 on AVX2."""
    lib = _lib()
    assert lib is not None
    return int(lib.qk_q8_tile_rows())


def _q8_retile(src: torch.Tensor, nr: int | None, to_tiles: bool) -> torch.Tensor:
    """Copy (N, K) int8 between row-major and `pack_q8` tiles (one output buffer): the full
    tiles as one run, then the tail tile of N % nr rows."""
    nr = q8_tile_rows() if nr is None else nr
    n, k = src.shape
    src_flat, out = src.reshape(-1), torch.empty(n * k, dtype=src.dtype, device=src.device)
    full = n // nr * nr
    for lo, rows in ((0, full), (full, n - full)):
        if not rows:
            continue
        r = min(rows, nr)
        span = slice(lo * k, (lo + rows) * k)
        shape_rm, shape_t = (rows // r, r, k // QBLOCK, QBLOCK), (rows // r, k // QBLOCK, r, QBLOCK)
        if to_tiles:
            out[span].view(shape_t).copy_(src_flat[span].view(shape_rm).transpose(1, 2))
        else:
            out[span].view(shape_rm).copy_(src_flat[span].view(shape_t).transpose(1, 2))
    return out.view(n, k)


def pack_q8(q: torch.Tensor, nr: int | None = None) -> torch.Tensor:
    """int8 (N, K) row-major -> qk_gemm_q8's tiled layout, same shape and bytes: tiles of `nr`
    rows (default `q8_tile_rows()`, the last tile holds the N % nr rest), each holding per 32
    columns 32 bytes of each of its rows in turn. K % 32 == 0."""
    return _q8_retile(q, nr, to_tiles=True)


def unpack_q8(t: torch.Tensor, nr: int | None = None) -> torch.Tensor:
    """Inverse of `pack_q8`: tiled (N, K) -> row-major int8 (N, K)."""
    return _q8_retile(t, nr, to_tiles=False)


def q8_rows(t: torch.Tensor, ids: torch.Tensor, nr: int | None = None) -> torch.Tensor:
    """Rows `ids` (any shape) of a `pack_q8`-tiled (N, K) table -> (*ids.shape, K) int8, without
    unpacking the table (a tied int8 embedding looks its tokens up in the head's tiles)."""
    nr = q8_tile_rows() if nr is None else nr
    n, k = t.shape
    full = n // nr * nr
    r = ids.reshape(-1).long()
    col = torch.arange(k, device=t.device)
    blk, within = col // QBLOCK, col % QBLOCK
    tail = r >= full
    width = torch.where(tail, n - full, nr)[:, None]  # rows in the row's tile
    tile_base = torch.where(tail, full, r // nr * nr) * k  # first byte of the tile
    j = torch.where(tail, r - full, r % nr)
    idx = (tile_base + j * QBLOCK)[:, None] + blk[None, :] * width * QBLOCK + within[None, :]
    return t.reshape(-1)[idx].view(*ids.shape, k)


def act_format(kernel: str) -> tuple[int, int]:
    """(code range, block of columns with one scale) of the activations `kernel` ("q8" for
    `gemm_q8`, "q4" for `gemm_q4`) quantizes x to."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    return q8_act_format() if kernel == "q8" else (Q4_ACT_MAX, Q4_ACT_BLOCK)


def _quant_act(lib: ctypes.CDLL, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Quantize x (M, K) fp32 contiguous as `kernel`'s quantizer does into one scratch buffer
    laid out dx | xs | xq (block scales, block sums: room for (M, K/32) fp32 each, the first
    (M, ceil(K / block)) used; codes (M, K) int8); returns the buffer."""
    m, k = x.shape
    nb = m * (k // QBLOCK)
    scratch = torch.empty(2 * nb + (m * k + 3) // 4, dtype=torch.float32)
    base = scratch.data_ptr()
    quant = lib.qk_quant_act_q8 if kernel == "q8" else lib.qk_quant_act_q4
    quant(x.data_ptr(), base + 8 * nb, base, base + 4 * nb, m, k)
    return scratch


def quantize_activations(x: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> (int8 codes (M, K), block scales (M, B), block sums of the dequantized
    codes (M, B)) as `kernel` ("q8" / "q4", see `act_format`) sees x; B = ceil(K / block), a
    row's last block covering the rest (exposed for tests)."""
    lib = _lib()
    assert lib is not None
    x = x.float().contiguous()
    m, k = x.shape
    nb = m * (k // QBLOCK)
    nblk = -(-k // act_format(kernel)[1])
    scratch = _quant_act(lib, x, kernel)
    xq = scratch[2 * nb :].view(torch.int8)[: m * k].view(m, k)
    return xq, scratch[: m * nblk].view(m, nblk), scratch[nb : nb + m * nblk].view(m, nblk)


def _prologue(
    x: torch.Tensor, n: int, kernel: str
) -> tuple[ctypes.CDLL, int, int, int, int, int, torch.Tensor, torch.Tensor]:
    """Quantize x (M, K) as `kernel` does and allocate y (M, n): what every int8-activation
    kernel call starts with.
    Returns the library, M, K, the addresses of the int8 codes, block scales and block sums (in
    one scratch buffer, `_quant_act`, kept alive by the returned tensor), the buffer and y."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.device.type == "cpu"
    x = x.contiguous()
    m, k = x.shape
    nb = m * (k // QBLOCK)
    scratch = _quant_act(lib, x, kernel)
    base = scratch.data_ptr()
    return lib, m, k, base + 8 * nb, base, base + 4 * nb, scratch, torch.empty(m, n, dtype=torch.float32)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _gemm_q8_impl(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    n = qweight.shape[0]
    lib, m, k, xq, dx, xs, _scratch, y = _prologue(x, n, "q8")
    lib.qk_gemm_q8(xq, dx, xs, qweight.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k)
    return y


_gemm_q8_op = torch.library.custom_op("qwenkit::gemm_q8", mutates_args=())(_gemm_q8_impl)


@_gemm_q8_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def _gemm_q4_impl(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    n = codes.shape[0]
    lib, m, k, xq, dx, xs, _scratch, y = _prologue(x, n, "q4")
    lib.qk_gemm_q4(
        xq, dx, xs, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), _ptr(bias), y.data_ptr(),
        m, n, k, group_size,
    )  # fmt: skip
    return y


_gemm_q4_op = torch.library.custom_op("qwenkit::gemm_q4", mutates_args=())(_gemm_q4_impl)


@_gemm_q4_op.register_fake
def _(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def supports_q(k: int, group_size: int | None = None) -> bool:
    """Whether the int8-activation kernels take this input width (int8) / width and int4 group
    size (int4 codes come in pairs of 32-column blocks: K % 64 == 0)."""
    ok = k % QBLOCK == 0 and k // QBLOCK <= MAX_BLOCKS
    if group_size is not None:
        ok = ok and k % (2 * QBLOCK) == 0 and group_size % QBLOCK == 0 and k % group_size == 0
    return ok


def gemm_q8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N): int8 (N, K) per-channel weights in the `pack_q8` layout, x
    quantized as `act_format("q8")` says;
    + bias (N,) fp32 if given (added in the kernel, rounded as ``y + bias``)."""
    if torch.compiler.is_compiling():
        return _gemm_q8_op(x, qweight, scales, bias)
    return _gemm_q8_impl(x, qweight, scales, bias)  # eager: skip the op dispatch (~30 us a call)


def gemm_q4(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N): int4 codes in the paired-block layout (`pack_q4`), bf16 scales/zeros
    (N, K/group_size) with w = (c - 8) * s + z; x quantized to int8 per 32; + bias as `gemm_q8`."""
    if torch.compiler.is_compiling():
        return _gemm_q4_op(x, codes, scales, zeros, group_size, bias)
    return _gemm_q4_impl(x, codes, scales, zeros, group_size, bias)


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in 0..15 -> (N, K/2): per 64 columns, byte j = c[j] | c[j+32] << 4
    (block 2p in the low nibbles, block 2p+1 in the high ones); K % 64 == 0."""
    n, k = codes.shape
    c = codes.view(n, k // (2 * QBLOCK), 2, QBLOCK)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_q4`: (N, K/2) -> uint8 codes (N, K)."""
    n, half = packed.shape
    p = packed.view(n, half // QBLOCK, QBLOCK)
    return torch.stack((p & 0xF, p >> 4), dim=2).reshape(n, 2 * half)
