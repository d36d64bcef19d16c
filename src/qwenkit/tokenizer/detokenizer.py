"""Streaming (incremental) detokenization.

Contract of :class:`IncrementalDetokenizer`:

* feed token ids one or several at a time with :meth:`~IncrementalDetokenizer.add`; each call
  returns the *new* text (possibly ``""``);
* a delta never ends inside a UTF-8 character: bytes of an incomplete character are held back
  until the character completes (so no spurious U+FFFD appears mid-stream); a U+FFFD is only
  emitted where the full decode has one too (genuinely invalid bytes);
* ``"".join(deltas) + flush() == tokenizer.decode(all_ids, skip_special_tokens=...)`` exactly;
* the work per call is proportional to the ids fed (plus the few held-back ids), never to the
  length of the whole sequence.

Two strategies:

``"bytes"`` (default for byte-level BPE tokenizers such as Qwen's): each id maps to the raw
bytes it contributes (:meth:`Tokenizer.token_bytes`), and a stateful UTF-8 decoder with
``errors="replace"`` turns the byte stream into text. Python's decoder substitutes maximal
invalid subparts exactly like Rust's ``String::from_utf8_lossy`` used by ``tokenizers``.

``"offsets"`` (any tokenizer with ``decode``; the vLLM / mini-sglang scheme): keep a
``prefix_offset`` / ``read_offset`` window, decode ``ids[prefix:read]`` and ``ids[prefix:]``
and emit the difference once it no longer ends in U+FFFD (text before a trailing U+FFFD run is
emitted right away, so feeding ``[complete…, partial]`` in one call does not stall).
"""
from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable
from typing import Any, Literal, Protocol

__all__ = ["IncrementalDetokenizer"]

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class _Decoding(Protocol):  # pragma: no cover - typing only
    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text deltas (see module docstring).

    Args:
        tokenizer: a :class:`qwenkit.tokenizer.Tokenizer` (or anything with
            ``decode(ids, skip_special_tokens=...)`` for the ``"offsets"`` mode).
        skip_special_tokens: drop special tokens (``<|im_end|>`` …) from the text, as
            ``decode(..., skip_special_tokens=True)`` does.
        mode: ``"auto"`` (bytes when the tokenizer supports it), ``"bytes"`` or ``"offsets"``.
    """

    def __init__(
        self,
        tokenizer: _Decoding,
        *,
        skip_special_tokens: bool = False,
        mode: Literal["auto", "bytes", "offsets"] = "auto",
    ) -> None:
        if mode not in ("auto", "bytes", "offsets"):
            raise ValueError(f"mode must be 'auto', 'bytes' or 'offsets', got {mode!r}")
        can_bytes = bool(getattr(tokenizer, "supports_token_bytes", False))
        if mode == "bytes" and not can_bytes:
            raise ValueError("this tokenizer cannot map tokens to bytes; use mode='offsets'")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.mode: Literal["bytes", "offsets"] = "bytes" if mode == "bytes" or (mode == "auto" and can_bytes) else "offsets"
        vocab = getattr(tokenizer, "vocab_size", None)
        self._vocab_size: int | None = vocab if isinstance(vocab, int) else None
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._finished = False
        # bytes mode
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip_ids: frozenset[int] = (
            frozenset(getattr(tokenizer, "special_token_ids", ())) if skip_special_tokens else frozenset()
        )
        # offsets mode
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending_chars = 0  # chars past the prefix text already emitted from the window

    # ------------------------------------------------------------------ public
    @property
    def ids(self) -> list[int]:
        """All ids fed so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the newly completed text (maybe ``""``)."""
        if self._finished:
            raise ValueError("detokenizer already flushed; create a new one")
        if isinstance(ids, int):
            new = [ids]
        else:
            if hasattr(ids, "tolist"):
                ids = ids.tolist()
            new = [int(i) for i in ids]
        if not new:
            return ""
        vocab = self._vocab_size
        if vocab is not None:
            for i in new:
                if not 0 <= i < vocab:
                    raise ValueError(f"token id {i} is outside [0, {vocab})")
        self._ids.extend(new)
        delta = self._add_bytes(new) if self.mode == "bytes" else self._emit_offsets(force=False)
        if delta:
            self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """End of stream: return the remaining held-back text (incomplete bytes become U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        if self.mode == "bytes":
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._emit_offsets(force=True)
        if delta:
            self._pieces.append(delta)
        return delta

    # ------------------------------------------------------------------ bytes mode
    def _add_bytes(self, new: list[int]) -> str:
        token_bytes = self.tokenizer.token_bytes  # type: ignore[attr-defined]
        skip = self._skip_ids
        data = b"".join(token_bytes(i) for i in new if i not in skip)
        return self._utf8.decode(data, final=False) if data else ""

    # ------------------------------------------------------------------ offsets mode
    def _emit_offsets(self, *, force: bool) -> str:
        if self._read_offset >= len(self._ids) and not force:
            return ""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        start = len(prefix_text) + self._pending_chars
        if force or (len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT)):
            # the window ends on a complete character: emit everything and slide the window
            delta = new_text[start:]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pending_chars = 0
            return delta
        # the window ends inside a character: emit what precedes the trailing U+FFFD run (that
        # text can no longer change) and keep the window where it is
        stable = len(new_text.rstrip(_REPLACEMENT))
        if stable > start:
            self._pending_chars += stable - start
            return new_text[start:stable]
        return ""
