"""qwenkit: run, serve, quantize, fine-tune and evaluate Qwen2.5 models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["SamplingParams", "load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import qwenkit` cheap (torch is imported only when needed).
    if name in ("load_model", "load_tokenizer"):
        from qwenkit.loaders import load

        return getattr(load, name)
    if name == "SamplingParams":
        from qwenkit.sampling_params import SamplingParams

        return SamplingParams
    if name == "LLM":
        from qwenkit.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")
