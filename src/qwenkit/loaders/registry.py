"""Compatibility names: the registry's public API, now split by concern.

``qwenkit.loaders.registry`` used to hold the catalog, the cache, both download sources and
name resolution. They live in :mod:`~qwenkit.loaders.catalog` (models), :mod:`~.cache` (files,
markers, lock), :mod:`~.pypi` and :mod:`~.hub` (sources), :mod:`~.resolve` (``resolve_model``,
``ensure_model_file``, ``pull``) and :mod:`~.settings` (environment variables). This module
re-exports the public names so existing imports keep working; new code imports the modules above.
"""
from __future__ import annotations

from qwenkit.errors import ModelIntegrityError, ModelNotAvailableError, QwenkitError

from .cache import cache_home, is_cached, model_dir, model_path, sha256_file, verify_file
from .catalog import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelEntry,
    PartSpec,
    UnknownModelError,
    get_entry,
    list_models,
    register_model,
)
from .resolve import ResolvedModel, ensure_model_file, pull, resolve_model

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
