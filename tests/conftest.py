"""Shared fixtures.

Fast tests run offline from an empty model cache: they use the generated tiny tokenizer
(`tests/tiny_tokenizer.py`) and tiny random models. Only tests marked ``slow`` may use the real
models, which resolve through ``qwenkit.loaders.resolve`` (pulled on first use, cached under
``QWENKIT_HOME``); ``QWENKIT_TEST_GGUF_05B`` / ``QWENKIT_TEST_GGUF_15B`` override the path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REAL_MODEL_FIXTURES = ("gguf_05b_path", "gguf_15b_path")
_running: dict[str, Any] = {}


def _is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    bad = [it.nodeid for it in items
           if not _is_slow(it) and set(REAL_MODEL_FIXTURES) & set(getattr(it, "fixturenames", ()))]  # fmt: skip
    if bad:
        raise pytest.UsageError("tests that use the real model must be marked slow:\n  " + "\n  ".join(bad))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running["item"] = item


def _real_gguf(env: str, name: str) -> Path:
    item = _running.get("item")
    if item is not None and not _is_slow(item):  # reached through getfixturevalue
        pytest.fail(f"{item.nodeid} uses the real model but is not marked slow", pytrace=False)
    override = os.environ.get(env)
    if override:
        return Path(override)
    from qwenkit.loaders.resolve import ensure_model_file

    return Path(ensure_model_file(name))


@pytest.fixture(scope="session")
def gguf_05b_path() -> Path:
    return _real_gguf("QWENKIT_TEST_GGUF_05B", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gguf_15b_path() -> Path:
    return _real_gguf("QWENKIT_TEST_GGUF_15B", "qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated tiny Qwen2.5-style tokenizer as an HF folder (see tests/tiny_tokenizer.py)."""
    from tests.tiny_tokenizer import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    from qwenkit.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module", params=["tiny", pytest.param("real", marks=pytest.mark.slow)])
def qwen_tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """A tokenizer HF folder: the tiny generated one, and (slow) the real Qwen2.5's (a save_hf copy
    of the GGUF's). Tests on it run on both."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_tokenizer_dir")
    from tests.test_tokenizer import hf_dir_for

    return hf_dir_for(request.config, request.getfixturevalue("gguf_05b_path"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A tiny random Qwen2 over the tiny tokenizer's vocabulary, as an HF folder.

    Loads in well under a second, so CLI/server plumbing can be tested end to end.
    """
    import torch

    from qwenkit.config import ModelConfig
    from qwenkit.loaders.hf import export_hf
    from qwenkit.model import Qwen2ForCausalLM
    from tests.serve_utils import stop_ids
    from tests.tiny import tiny_hf_config

    out = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(
        tiny_hf_config(vocab_size=len(tiny_tokenizer), num_hidden_layers=2, tie_word_embeddings=True,
                       bos_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    export_hf(model, out, tokenizer=tiny_tokenizer, generation=stop_ids(tiny_tokenizer))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread (their matmuls gain nothing from threads, and on a shared
    machine OpenMP spin-waits make them 10-100x slower). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
