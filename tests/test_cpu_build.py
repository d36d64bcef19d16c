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


def test_avx2_build_where_vnni_is_used() -> None:
    """On an AVX512-VNNI machine the suite runs the VNNI build; the AVX2 build (other numerics:
    7-bit activations per 32, 2-row tiles) still has to compile and pass the kernel tests, so
    they run once more in a subprocess with QWENKIT_AVX512=0."""
    if build.lib() is None or not build.vnni_ok():
        pytest.skip("not an AVX512-VNNI build: the suite itself runs the AVX2 kernels")
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "QWENKIT_AVX512": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quant_linear.py",
         "tests/test_decode_step.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-500:]
