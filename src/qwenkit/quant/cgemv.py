"""The AVX2 int8 small-M kernel of `csrc/gemv_avx2.c`, compiled at first use, called via ctypes.

Why: torch's `_weight_int8pack_mm` needs bf16 activations (two extra cast passes, bf16 rounding
of x and y) and still reaches only ~5-10 GB/s at M=1 here, while decode is bound by streaming
the weights (~20 GB/s available). This kernel keeps fp32 activations and converts the int8
weights in registers. (An int4 variant was measured slower than torch's int4 kernel: unpacking
nibbles to fp32 costs more ALU than it saves in bytes, so int4 stays on torch's kernel.)

Build: ``gcc -O3 -mavx2 -mfma -fopenmp -shared -fPIC`` into the qwenkit cache
(``$QWENKIT_HOME/kernels`` or the platform cache dir), keyed by the source hash; about a second.
Set ``QWENKIT_CKERNELS=0`` to disable them (the torch kernels are used instead). Without a C
compiler or AVX2/FMA, `available()` is False and nothing changes.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "gemv_avx2.c"
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cache_dir() -> Path:
    home = os.environ.get("QWENKIT_HOME")
    if home:
        return Path(home) / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit")) / "kernels"


def _cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("QWENKIT_CKERNELS", "1") == "0" or not _cpu_ok():
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        logger.info("no C compiler: using torch's weight-only kernels")
        return None
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + cc.encode()).hexdigest()[:16]
    out = _cache_dir() / f"qk_gemv_{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(_SRC), "-o", str(tmp_so)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.warning("building %s failed, using torch kernels:\n%s", _SRC.name, proc.stderr[-2000:])
                return None
            os.replace(tmp_so, out)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(out))
    lib.qk_gemm_int8.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I]
    lib.qk_gemm_int8.restype = None
    return lib


@torch.compiler.assume_constant_result  # a constant for dynamo: no graph break in compiled decode
def available() -> bool:
    return _lib() is not None


@torch.library.custom_op("qwenkit::gemm_int8", mutates_args=())
def _gemm_int8_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.device.type == "cpu"
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.qk_gemm_int8(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), None, y.data_ptr(), m, n, k)
    return y


@_gemm_int8_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def gemm_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32; qweight int8 (N, K), scales fp32 (N,), bias fp32 (N,).

    A registered custom op (`torch.ops.qwenkit.gemm_int8`), so `torch.compile` keeps it in the
    graph instead of breaking on the ctypes call."""
    y = _gemm_int8_op(x, qweight, scales)
    return y if bias is None else y + bias
