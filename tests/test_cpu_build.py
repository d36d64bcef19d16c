"""The C kernels build on any machine that can build them.

Every kernel test skips when `build.lib()` is None (no compiler, no AVX2), so a compile error in
`csrc/` would otherwise turn those tests into skips and the suite green. This test fails instead,
with the compiler's message, wherever a C compiler and an AVX2/FMA CPU are present."""
from __future__ import annotations

import os
import subprocess

import pytest

from qwenkit.cpu import build


def test_c_kernels_build_where_they_can() -> None:
    if build.disabled():
        pytest.skip("C kernels disabled by QWENKIT_CKERNELS=0")
    cc = build.compiler()
    if cc is None or not build.cpu_ok():
        pytest.skip("no C compiler or no AVX2/FMA: the torch kernels are used")
    if build.lib() is None:
        proc = subprocess.run(
            [cc, *build.flags(), *map(str, build.SOURCES), "-o", os.devnull], capture_output=True, text=True
        )
        pytest.fail(f"the C kernels did not build:\n{proc.stderr[-3000:]}")


def test_vnni_build_where_the_cpu_has_it() -> None:
    """On an AVX512-VNNI CPU the GEMMs must use it (a silent AVX2 fallback halves their speed)."""
    if build.lib() is None:
        pytest.skip("C kernels not built here")
    assert build.isa() == ("avx512-vnni" if build.vnni_ok() else "avx2")
