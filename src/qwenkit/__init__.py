"""qwenkit: run, serve, quantize, fine-tune and evaluate Qwen2.5 models."""
from __future__ import annotations

__version__ = "0.1.0"
