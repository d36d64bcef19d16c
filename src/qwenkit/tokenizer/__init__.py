"""Qwen2.5 tokenizer, chat templates, streaming detokenizer and FIM prompts."""
from __future__ import annotations

from .chat_template import ChatTemplate, get_json_schema, render_chat_template
from .detokenizer import IncrementalDetokenizer
from .fim import fim_prompt, repo_fim_prompt, repo_prompt
from .tokenizer import (
    DEFAULT_MAX_LENGTH,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN_NON_SPECIAL_CONTROL_TOKENS,
    Tokenizer,
    qwen_bpe_backend,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN_NON_SPECIAL_CONTROL_TOKENS",
    "ChatTemplate",
    "IncrementalDetokenizer",
    "Tokenizer",
    "fim_prompt",
    "get_json_schema",
    "qwen_bpe_backend",
    "render_chat_template",
    "repo_fim_prompt",
    "repo_prompt",
]
