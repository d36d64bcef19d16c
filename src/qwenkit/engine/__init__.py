"""The serving engine: paged KV cache, prefix caching, continuous batching, sampling.

Nouns, one file each: `Sequence`, `BlockManager`, `Scheduler`, `KVCache` + paged attention,
`ModelRunner`, `Sampler`; `LLMEngine` ties them into add_request/step/abort, `LLM` is the offline
API and `AsyncLLMEngine` the asyncio one.

Exports resolve lazily, so importing a submodule (e.g. `qwenkit.engine.sampler` from
`tests/simple_loop.py`) does not pull in the whole engine.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "qwenkit.engine.llm",
    "AsyncLLMEngine": "qwenkit.engine.async_engine",
    "EngineConfig": "qwenkit.engine.llm_engine",
    "LLMEngine": "qwenkit.engine.llm_engine",
    "CompletionOutput": "qwenkit.engine.outputs",
    "Logprob": "qwenkit.engine.outputs",
    "RequestMetrics": "qwenkit.engine.outputs",
    "RequestOutput": "qwenkit.engine.outputs",
    "RequestOutputKind": "qwenkit.engine.outputs",
    "Usage": "qwenkit.engine.outputs",
    "SamplingParams": "qwenkit.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwenkit.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
