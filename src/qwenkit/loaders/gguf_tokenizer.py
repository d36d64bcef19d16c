"""The tokenizer stored in a GGUF file: ``tokenizer.ggml.*`` metadata -> :class:`Tokenizer`.

Reads ``tokenizer.ggml.{model,pre,tokens,token_type,merges,eos_token_id,padding_token_id}``,
``tokenizer.chat_template[.<name>]`` and ``<arch>.context_length``, and hands the vocabulary,
control tokens and templates to :func:`qwenkit.tokenizer.qwen_bpe_backend` / :class:`Tokenizer`.
Tokens of GGUF type CONTROL / USER_DEFINED become added tokens (special unless listed in
``non_special_tokens`` or USER_DEFINED); UNUSED ``[PAD…]`` fillers stay plain vocabulary entries
(:attr:`Tokenizer.unused_token_ids`). The GGUF's BOS id / ``add_bos_token`` are ignored: Qwen
never prepends a BOS token.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf

from qwenkit.tokenizer import DEFAULT_MAX_LENGTH, QWEN_NON_SPECIAL_CONTROL_TOKENS, Tokenizer, qwen_bpe_backend

from .gguf_reader import FastGGUFReader

__all__ = ["tokenizer_from_gguf"]

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's ``llama_token_type``).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


def _field_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value from a `gguf.GGUFReader` (fields with `.contents()`) or qwenkit's
    `FastGGUFReader` (plain Python values)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents() if hasattr(field, "contents") else field


def _merges(reader: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in _field_value(reader, "tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {m!r} in GGUF metadata")
        out.append((parts[0], parts[1]))
    return out


def _chat_templates(reader: Any) -> dict[str, str]:
    templates: dict[str, str] = {}
    template = _field_value(reader, "tokenizer.chat_template")
    if template is not None:
        templates["default"] = str(template)
    # llama.cpp stores extra named templates as tokenizer.chat_template.<name>
    for key in reader.fields:
        if key.startswith("tokenizer.chat_template."):
            templates[key.split(".", 2)[2]] = str(_field_value(reader, key))
    return templates


def tokenizer_from_gguf(
    path_or_reader: str | os.PathLike[str] | gguf.GGUFReader | FastGGUFReader,
    *,
    non_special_tokens: Iterable[str] = QWEN_NON_SPECIAL_CONTROL_TOKENS,
) -> Tokenizer:
    """Build the tokenizer from GGUF metadata (see the module doc).

    Args:
        path_or_reader: a ``.gguf`` path or an open reader (pass the reader when the weights
            loader already has one: parsing a file takes seconds).
        non_special_tokens: control-token strings to register with ``special=False``.

    Raises ``ValueError`` for a missing file or missing/unsupported tokenizer metadata.
    """
    if isinstance(path_or_reader, (gguf.GGUFReader, FastGGUFReader)):
        reader: Any = path_or_reader
    else:
        path = Path(path_or_reader)
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        reader = FastGGUFReader(path)

    model = _field_value(reader, "tokenizer.ggml.model")
    if model is None:
        raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2')")
    pre = _field_value(reader, "tokenizer.ggml.pre")
    if pre not in (None, "qwen2"):
        logger.warning("GGUF pre-tokenizer is %r; using the Qwen2 split regex anyway", pre)

    tokens: list[str] = list(_field_value(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF file has an empty tokenizer.ggml.tokens")
    token_types: list[int] = list(_field_value(reader, "tokenizer.ggml.token_type") or [])
    if token_types and len(token_types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
    if not token_types:
        token_types = [_TT_NORMAL] * len(tokens)

    non_special = frozenset(non_special_tokens)
    added: list[tuple[str, bool]] = []
    unused: list[int] = []
    for i, (t, tt) in enumerate(zip(tokens, token_types)):
        if tt == _TT_CONTROL or tt == _TT_USER_DEFINED:
            added.append((t, tt == _TT_CONTROL and t not in non_special))
        elif tt == _TT_UNUSED:
            unused.append(i)
    backend = qwen_bpe_backend(tokens, _merges(reader), added)

    def tok_at(key: str) -> str | None:
        idx = _field_value(reader, key)
        if idx is None:
            return None
        idx = int(idx)
        if not 0 <= idx < len(tokens):
            raise ValueError(f"{key}={idx} is outside the vocabulary")
        return tokens[idx]

    bos_id = _field_value(reader, "tokenizer.ggml.bos_token_id")
    add_bos = _field_value(reader, "tokenizer.ggml.add_bos_token")
    if bos_id is not None or add_bos:
        logger.debug("ignoring GGUF bos_token_id=%s add_bos_token=%s: Qwen adds no BOS", bos_id, add_bos)
    arch = _field_value(reader, "general.architecture")
    ctx = _field_value(reader, f"{arch}.context_length") if arch else None
    return Tokenizer(
        backend,
        chat_template=_chat_templates(reader) or None,
        eos_token=tok_at("tokenizer.ggml.eos_token_id"),
        pad_token=tok_at("tokenizer.ggml.padding_token_id"),
        bos_token=None,
        model_max_length=int(ctx) if ctx else DEFAULT_MAX_LENGTH,
        unused_token_ids=unused,
    )
