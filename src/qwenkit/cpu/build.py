"""Build and load qwenkit's C kernels (`csrc/*.c`) as one shared library.

Build: ``gcc -O3 -mavx2 -mfma -mf16c -ffp-contract=off -fopenmp -shared -fPIC`` into the qwenkit
cache (``$QWENKIT_HOME/kernels`` or the platform cache dir), keyed by the sources' hash and the
flags; a second or two, once. ``-ffp-contract=off``: a written mul + add stays two roundings (the
elementwise ops then round exactly as torch's); the GEMM kernels ask for FMAs explicitly.
On a CPU with AVX512-VNNI (+VL, BW) the flags add ``-mavx512f -mavx512bw -mavx512vl
-mavx512vnni``: the int8-activation GEMMs then sum each 4-byte group with one ``vpdpbusd``
instead of ``vpmaddubsw`` + ``vpmaddwd``, and the int8 kernel switches to its VNNI numerics
(8-bit activations per 128 columns instead of 7-bit per 32, 3-row weight tiles: see
``qgemm_avx2.c``); the compiler gets 32 vector registers. ``QWENKIT_AVX512=0`` keeps the AVX2 build.
Set ``QWENKIT_CKERNELS=0`` to disable them (every caller then uses torch). Without a C compiler
or AVX2/FMA, `lib()` is None and nothing changes.

OpenMP: the library links ``libgomp.so.1``; torch's wheel loads its own copy under the same
soname first, so both share one thread pool (no oversubscription).
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

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
BASE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
VNNI_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
ISA_NAMES = {1: "avx2", 2: "avx512-vnni"}  # qk_isa() of the built library


def cache_dir() -> Path:
    home = os.environ.get("QWENKIT_HOME")
    if home:
        return Path(home) / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit")) / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_ok() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def vnni_ok() -> bool:
    """AVX512-VNNI with 256-bit forms (VL) on this CPU, and not turned off by QWENKIT_AVX512=0."""
    return os.environ.get("QWENKIT_AVX512", "1") != "0" and {
        "avx512f", "avx512bw", "avx512vl", "avx512_vnni"
    } <= cpu_flags()  # fmt: skip


def flags() -> tuple[str, ...]:
    """The compiler flags for this CPU."""
    return BASE_FLAGS + (VNNI_FLAGS if vnni_ok() else ())


def disabled() -> bool:
    """``QWENKIT_CKERNELS=0``: the user turned the C kernels off."""
    return os.environ.get("QWENKIT_CKERNELS", "1") == "0"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` (default gcc), else ``cc``; None when there is none."""
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    """The compiled library, or None (disabled, no compiler, no AVX2, or the build failed)."""
    if disabled() or not cpu_ok():
        return None
    cc = compiler()
    if cc is None:
        logger.info("no C compiler: using torch kernels")
        return None
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    cflags = flags()
    tag = hashlib.sha256(src + cc.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    out = cache_dir() / f"qk_cpu_{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, *cflags, *map(str, SOURCES), "-o", str(tmp_so)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.warning("building the C kernels failed, using torch kernels:\n%s", proc.stderr[-2000:])
                return None
            os.replace(tmp_so, out)  # atomic: concurrent builders race harmlessly
    so = ctypes.CDLL(str(out))
    so.qk_isa.restype = ctypes.c_int64
    logger.info("qwenkit C kernels: %s (%s)", ISA_NAMES.get(so.qk_isa(), "?"), out.name)
    return so


def isa() -> str | None:
    """The instruction set the built kernels' integer dot products use, or None (not built)."""
    so = lib()
    return None if so is None else ISA_NAMES.get(so.qk_isa(), "?")
