"""Build and load qwenkit's C kernels (`csrc/*.c`) as one shared library.

Build: ``gcc -O3 -mavx2 -mfma -mf16c -ffp-contract=off -fopenmp -shared -fPIC`` into the qwenkit
cache (``$QWENKIT_HOME/kernels`` or the platform cache dir), keyed by the sources' hash; a second
or two, once. ``-ffp-contract=off``: a written mul + add stays two roundings (the elementwise ops
then round exactly as torch's); the GEMM kernels ask for FMAs explicitly.
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
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    home = os.environ.get("QWENKIT_HOME")
    if home:
        return Path(home) / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit")) / "kernels"


def cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


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
    tag = hashlib.sha256(src + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"qk_cpu_{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp_so)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                logger.warning("building the C kernels failed, using torch kernels:\n%s", proc.stderr[-2000:])
                return None
            os.replace(tmp_so, out)  # atomic: concurrent builders race harmlessly
    return ctypes.CDLL(str(out))
