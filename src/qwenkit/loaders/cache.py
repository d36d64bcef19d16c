"""The local model cache: where files live, their checksum markers, the pull lock.

Layout: ``<home>/models/<name>/<filename>`` where ``<home>`` is ``$QWENKIT_HOME`` or
``platformdirs.user_cache_dir("qwenkit")``. Next to the file, ``<filename>.verified`` records the
size, mtime and sha256 seen when the file was last hashed, so later loads do not re-hash ~1 GB.
Downloads are written to ``<filename>.partial`` and renamed into place only once verified
(:func:`install_verified`), so the final path never holds unverified bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenkit.errors import ModelIntegrityError, ModelNotAvailableError

from . import settings
from .catalog import ModelEntry, get_entry

__all__ = [
    "CHUNK",
    "cache_home",
    "cache_lock",
    "check_disk_space",
    "install_verified",
    "is_cached",
    "model_dir",
    "model_path",
    "move_aside",
    "partial_path",
    "progress_bar",
    "remove_marker",
    "sha256_file",
    "verify_file",
]

logger = logging.getLogger(__name__)

#: Read/write block size when hashing and assembling files.
CHUNK = 8 * 1024 * 1024
_MARKER_SUFFIX = ".verified"
_PARTIAL_SUFFIX = ".partial"


def cache_home() -> Path:
    """The cache root: ``$QWENKIT_HOME`` or ``platformdirs.user_cache_dir("qwenkit")``."""
    root = settings.cache_root()
    if root is not None:
        return root
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit"))


def model_dir(name: str) -> Path:
    """``<home>/models/<name>`` for a registered model (not created)."""
    return cache_home() / "models" / get_entry(name).name


def model_path(name: str) -> Path:
    """Where the assembled file of a registered model lives in the cache (may not exist)."""
    return model_dir(name) / get_entry(name).filename


def partial_path(final: Path) -> Path:
    """The download target ``<final>.partial``."""
    return final.with_name(final.name + _PARTIAL_SUFFIX)


def progress_bar(**kw: Any) -> Any:
    """A ``tqdm`` bar honouring ``$QWENKIT_PROGRESS``."""
    from tqdm.auto import tqdm

    kw.setdefault("disable", settings.progress_disable())
    kw.setdefault("dynamic_ncols", True)
    return tqdm(**kw)


def sha256_file(path: Path, *, desc: str | None = None) -> str:
    """The sha256 hex digest of ``path`` (with a byte progress bar)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress_bar(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=desc or f"sha256 {path.name}") as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# ----------------------------------------------------------------------------- markers


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, sha: str) -> None:
    st = path.stat()
    data = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    marker = _marker_path(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, marker)


def _marker_matches(path: Path, sha: str) -> bool:
    data = _read_marker(path)
    if data is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return data.get("size") == st.st_size and data.get("mtime_ns") == st.st_mtime_ns and data.get("sha256") == sha


def remove_marker(path: Path) -> None:
    """Forget that ``path`` was verified (no error when there is no marker)."""
    with contextlib.suppress(OSError):
        _marker_path(path).unlink()


def verify_file(path: Path, *, size: int, sha256: str, use_marker: bool = True) -> bool:
    """True iff ``path`` exists with ``size`` bytes and digest ``sha256``.

    With ``use_marker``, a ``.verified`` marker matching the file's current size/mtime and the
    expected digest short-cuts the hash; a successful hash (re)writes the marker.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != size:
        return False
    if use_marker and _marker_matches(path, sha256):
        return True
    actual = sha256_file(path, desc=f"verify {path.name}")
    if actual != sha256:
        return False
    _write_marker(path, actual)
    return True


def is_cached(name: str) -> bool:
    """True if the registered model's file is in the cache with a valid ``.verified`` marker.

    Does not hash; a present file without a marker counts as not (yet) verified.
    """
    entry = get_entry(name)
    p = model_path(name)
    return p.is_file() and p.stat().st_size == entry.size and _marker_matches(p, entry.sha256)


def move_aside(path: Path, why: str) -> Path:
    """Rename a bad cached file to ``<file>.corrupt`` (kept for inspection); return the new path."""
    bad = path.with_name(path.name + ".corrupt")
    logger.warning("%s: %s; moving it to %s", path, why, bad)
    remove_marker(path)
    os.replace(path, bad)
    return bad


def install_verified(entry: ModelEntry, partial: Path, final: Path, digest: str, written: int) -> Path:
    """Check ``partial`` against the entry; rename it to ``final`` or delete it and raise.

    Raises :class:`ModelIntegrityError` (with ``path``, ``expected`` and ``actual`` attributes)
    when the size or digest differs.
    """
    if written != entry.size or digest != entry.sha256:
        with contextlib.suppress(OSError):
            partial.unlink()
        err = ModelIntegrityError(
            f"{final.name} for model {entry.name!r} failed verification: expected {entry.size} bytes "
            f"with sha256 {entry.sha256}, got {written} bytes with sha256 {digest}; the file was "
            "deleted. The downloaded parts are corrupted or do not belong to this registry entry."
        )
        err.path = final  # type: ignore[attr-defined]
        err.expected = entry.sha256  # type: ignore[attr-defined]
        err.actual = digest  # type: ignore[attr-defined]
        raise err
    os.replace(partial, final)
    _write_marker(final, digest)
    logger.info("model %s ready at %s", entry.name, final)
    return final


# ----------------------------------------------------------------------------- pull guards


@contextlib.contextmanager
def cache_lock(directory: Path, timeout: float) -> Iterator[None]:
    """An inter-process lock on ``directory/.lock`` (no-op where ``fcntl`` is unavailable)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / ".lock", "a+") as fh:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not announced:
                    logger.info("waiting for another process pulling into %s", directory)
                    announced = True
                if time.monotonic() > deadline:
                    raise ModelNotAvailableError(
                        f"timed out after {timeout:.0f}s waiting for the lock {directory / '.lock'} held by "
                        "another process pulling this model; retry later or remove a stale lock holder"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_disk_space(directory: Path, entry: ModelEntry) -> None:
    """Raise :class:`ModelNotAvailableError` unless ``directory`` can hold the file plus a few parts."""
    need = entry.size + 3 * (entry.size // entry.n_parts + 1)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise ModelNotAvailableError(
            f"not enough disk space in {directory} to pull {entry.name!r}: need about "
            f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; free space or set QWENKIT_HOME "
            "to a larger disk"
        )
