"""Qwen2.5 byte-level BPE tokenizer on top of the HF ``tokenizers`` library.

The tokenizer can be built from two sources that describe the same thing:

* a byte-level BPE vocabulary + merges + control tokens (:func:`qwen_bpe_backend`); this is how
  :mod:`qwenkit.loaders.gguf_tokenizer` builds it from GGUF metadata, which this package does
  not parse, and
* a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json`` [+ ``generation_config.json``]),
  the format :meth:`Tokenizer.save_hf` writes, read by :meth:`Tokenizer.from_hf_dir`.

Facts implemented here (SPEC §1):

* byte-level BPE, 151,643 regular tokens + 22 control tokens (151643 ``<|endoftext|>`` …
  151664 ``<|file_sep|>``), NFC normalisation, the Qwen2 split regex, **no BOS**;
* ``<tool_call>``, ``</tool_call>`` and the FIM / repo tokens are added tokens that are *not*
  special (they survive ``skip_special_tokens=True``), every other control token is special;
* GGUF vocabularies are padded to the embedding size with ``[PAD<id>]`` fillers (token type
  UNUSED). They are kept as ordinary, unreachable vocabulary entries, exactly like
  ``transformers`` does when it loads the GGUF: no text ever encodes to them and decoding one
  yields its literal ``[PAD<id>]`` spelling. :attr:`Tokenizer.unused_token_ids` lists them so a
  sampler can mask them.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .chat_template import ChatTemplate, Message, Tool

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN_NON_SPECIAL_CONTROL_TOKENS",
    "Tokenizer",
    "bytes_to_unicode",
    "qwen_bpe_backend",
]

logger = logging.getLogger(__name__)

#: The Qwen2 pre-tokenizer split pattern (SPEC §1), used with ``behavior="isolated"``.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Control tokens that Qwen's ``tokenizer_config.json`` marks ``special: false``. GGUF files store
#: the FIM / repo tokens with token type CONTROL, which on its own would make them special.
QWEN_NON_SPECIAL_CONTROL_TOKENS: frozenset[str] = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

# Qwen's stop tokens: instruct models end turns with <|im_end|>, base models with <|endoftext|>.
_QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
#: ``model_max_length`` when the source does not give one (Qwen2.5's context length).
DEFAULT_MAX_LENGTH = 32768


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode-character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _byte_translation() -> dict[int, str]:
    """``str.translate`` table: byte-level char -> latin-1 char of its byte. Chars below U+0100
    that are not byte-level chars map to U+FFFF, so ``.encode("latin-1")`` fails for them."""
    table: dict[int, str] = {c: "\uffff" for c in range(256)}
    table.update({ord(c): chr(b) for c, b in _unicode_to_bytes().items()})
    return table


def qwen_bpe_backend(
    tokens: Sequence[str],
    merges: Iterable[tuple[str, str]],
    added_tokens: Iterable[tuple[str, bool]] = (),
) -> _HFTokenizer:
    """A ``tokenizers.Tokenizer`` with Qwen2's pipeline over a byte-level BPE vocabulary.

    ``tokens[i]`` is the byte-level spelling of id ``i``; ``merges`` are BPE merge pairs in rank
    order; ``added_tokens`` are ``(content, special)`` control tokens, each already in ``tokens``.
    Raises ``ValueError`` for a duplicate token. Pass the result to :class:`Tokenizer`.
    """
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    tok = _HFTokenizer(
        BPE(
            vocab=vocab,
            merges=list(merges),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # All added tokens already have ids in the vocabulary, so order does not matter here.
    tok.add_tokens(
        [
            AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
            for t, special in added_tokens
        ]
    )
    return tok


class Tokenizer:
    """Qwen2.5 tokenizer: encode / decode / chat templates / export to a HF folder.

    Construct it with :meth:`from_hf_dir`, or pass an already configured ``tokenizers.Tokenizer``
    (e.g. from :func:`qwen_bpe_backend`) to the constructor. Loading by model name, ``.gguf``
    file or hub id is :func:`qwenkit.load_tokenizer`.

    Contracts:

    * :meth:`encode` never adds BOS/EOS; control tokens written inside the text are recognised
      as single tokens (like HF) unless ``split_special_tokens=True``.
    * ``decode(encode(s)) == unicodedata.normalize("NFC", s)`` for every string ``s``.
    * :attr:`eos_token_ids` always contains ``<|im_end|>`` and ``<|endoftext|>`` when the
      vocabulary has them: generation should stop on any of them.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        chat_template: str | Mapping[str, str] | None = None,
        eos_token: str | None = "<|im_end|>",
        pad_token: str | None = "<|endoftext|>",
        bos_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        model_max_length: int = DEFAULT_MAX_LENGTH,
        unused_token_ids: Iterable[int] = (),
    ) -> None:
        if not isinstance(backend, _HFTokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._tok = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if isinstance(chat_template, Mapping):
            self._chat_templates: dict[str, str] = {str(k): str(v) for k, v in chat_template.items()}
        elif chat_template is not None:
            self._chat_templates = {"default": chat_template}
        else:
            self._chat_templates = {}
        for name, tok in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} is not in the vocabulary")
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.model_max_length = int(model_max_length)
        self.unused_token_ids: tuple[int, ...] = tuple(sorted(set(int(i) for i in unused_token_ids)))

        eos_ids: list[int] = []
        candidates: list[int | None] = [self.token_to_id(eos_token) if eos_token else None]
        candidates += [int(i) for i in extra_eos_token_ids]
        candidates += [backend.token_to_id(t) for t in _QWEN_STOP_TOKENS]
        for i in candidates:
            if i is not None and i not in eos_ids:
                if not 0 <= i < self._vocab_size:
                    raise ValueError(f"eos token id {i} is outside the vocabulary (size {self._vocab_size})")
                eos_ids.append(i)
        self._eos_token_ids = tuple(eos_ids)

        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        self._token_bytes: dict[int, bytes] = {}
        self._compiled_templates: dict[str, ChatTemplate] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer from a Hugging Face folder.

        Needs ``tokenizer.json``; reads ``tokenizer_config.json`` (chat template, eos/pad/bos
        tokens, ``added_tokens_decoder`` special flags, ``model_max_length``),
        ``chat_template.jinja`` / ``chat_template.json`` when present, and the ``eos_token_id``
        of ``generation_config.json`` (extra stop ids).
        """
        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{root} has no tokenizer.json")
        backend = _HFTokenizer.from_file(str(tj))
        cfg: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))

        # tokenizer_config's added_tokens_decoder is authoritative for the special flag.
        current = backend.get_added_tokens_decoder()
        fixes: list[AddedToken] = []
        for sid, spec in (cfg.get("added_tokens_decoder") or {}).items():
            tid = int(sid)
            content = spec.get("content")
            have = current.get(tid)
            if have is None or content is None or have.content != content:
                continue
            want = bool(spec.get("special", have.special))
            if have.special and not want:
                # tokenizers cannot un-special a token; transformers keeps such tokens special too
                logger.warning("tokenizer_config.json marks %r non-special; keeping tokenizer.json's flag", content)
            elif want and not have.special:
                fixes.append(
                    AddedToken(
                        content,
                        single_word=bool(spec.get("single_word", False)),
                        lstrip=bool(spec.get("lstrip", False)),
                        rstrip=bool(spec.get("rstrip", False)),
                        normalized=bool(spec.get("normalized", False)),
                        special=want,
                    )
                )
        if fixes:
            logger.info("tokenizer_config.json overrides the special flag of %d added tokens", len(fixes))
            backend.add_tokens(fixes)

        def tok_name(value: Any) -> str | None:
            if value is None:
                return None
            if isinstance(value, dict):
                return value.get("content")
            return str(value)

        template: str | dict[str, str] | None = None
        raw = cfg.get("chat_template")
        if isinstance(raw, list):
            template = {str(t["name"]): str(t["template"]) for t in raw}
        elif isinstance(raw, str):
            template = raw
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (root / "chat_template.json").is_file():
            template = json.loads((root / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")

        extra_eos: list[int] = []
        gen_path = root / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
            eid = gen.get("eos_token_id")
            if isinstance(eid, int):
                extra_eos.append(eid)
            elif isinstance(eid, list):
                extra_eos.extend(int(i) for i in eid)

        max_len = cfg.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_len, (int, float)) or max_len > 10**9:  # HF's "very large" sentinel
            max_len = DEFAULT_MAX_LENGTH
        default_eos = "<|im_end|>" if backend.token_to_id("<|im_end|>") is not None else None
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        unused = [i for i in range(vocab_size) if (backend.id_to_token(i) or "") == f"[PAD{i}]"]
        return cls(
            backend,
            chat_template=template,
            eos_token=tok_name(cfg["eos_token"]) if "eos_token" in cfg else default_eos,
            pad_token=tok_name(cfg.get("pad_token")),
            bos_token=tok_name(cfg.get("bos_token")),
            extra_eos_token_ids=extra_eos,
            model_max_length=int(max_len),
            unused_token_ids=unused,
        )

    # ------------------------------------------------------------------ basic properties
    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens and ``[PAD…]`` fillers included (151936 for Qwen2.5 GGUFs)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, eos_token_ids={list(self._eos_token_ids)}, "
            f"special={len(self._special_ids)}, chat_template={'yes' if self._chat_templates else 'no'})"
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All ids that end generation, primary EOS first (151645, 151643 for Qwen instruct)."""
        return self._eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        """Always ``None`` for Qwen (no BOS)."""
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(..., skip_special_tokens=True)``."""
        return self._special_ids

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Ids of all added (control) tokens, special or not."""
        return self._added_ids

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """``{id: AddedToken}`` of the added tokens, like ``transformers``' attribute."""
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as passed to chat templates (``eos_token``, ``pad_token``, …)."""
        out: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (byte-level spelling, e.g. ``'Ġworld'``), or ``None``."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """Byte-level token string of an id. Raises ``ValueError`` for an out-of-range id."""
        self._check_id(token_id)
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:  # a hole in the vocabulary
            raise ValueError(f"token id {token_id} has no token")
        return tok

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]

    def _check_id(self, token_id: int) -> None:
        if isinstance(token_id, bool) or not 0 <= int(token_id) < self._vocab_size:
            raise ValueError(f"token id {token_id!r} is outside [0, {self._vocab_size})")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False, *, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: any string (NFC-normalised first).
            add_special_tokens: accepted for HF compatibility; Qwen adds no BOS/EOS, so it has
                no effect.
            split_special_tokens: when true, control tokens written in ``text`` (special or
                not, e.g. ``"<|im_start|>"`` or ``"<tool_call>"``) are encoded as plain text.
                Use it for untrusted user content.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if split_special_tokens:
            return self._encode_plain(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, split_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` for many strings (parallel in Rust)."""
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"encode_batch expects strings, got {type(t).__name__}")
        if split_special_tokens:
            return [self._encode_plain(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_plain(self, text: str) -> list[int]:
        tok = self._tok
        normalized = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        pieces = tok.pre_tokenizer.pre_tokenize_str(normalized) if tok.pre_tokenizer is not None else [(normalized, None)]
        model = tok.model
        return [t.id for piece, _ in pieces for t in model.tokenize(piece)]

    def _as_id_list(self, ids: Iterable[int] | Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = [int(i) for i in ids]
        if out and (min(out) < 0 or max(out) >= self._vocab_size):
            bad = next(i for i in out if not 0 <= i < self._vocab_size)
            raise ValueError(f"token id {bad} is outside [0, {self._vocab_size})")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD (like HF).

        ``skip_special_tokens=True`` drops special added tokens (``<|im_end|>`` …) but keeps the
        non-special ones (``<tool_call>``, ``<|fim_prefix|>`` …).
        """
        return self._tok.decode(self._as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([self._as_id_list(b) for b in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ bytes (streaming)
    @property
    def supports_token_bytes(self) -> bool:
        """True when decoding is plain byte concatenation (ByteLevel decoder), so
        :meth:`token_bytes` describes :meth:`decode` exactly."""
        return type(self._tok.decoder).__name__ == "ByteLevel"

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes one token contributes to :meth:`decode` output.

        ``decode(ids) == b"".join(token_bytes(i) for i in ids).decode("utf-8", "replace")``
        for a ByteLevel tokenizer (see :attr:`supports_token_bytes`). Computed on first use
        per id and memoised (about 1 µs per new id).
        """
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        if not self.supports_token_bytes:
            raise ValueError("token_bytes needs a ByteLevel decoder")
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id!r} is outside [0, {self._vocab_size})")
        tok = self._tok.id_to_token(token_id)
        if tok is None:  # a hole in the vocabulary decodes to nothing
            data = b""
        else:
            try:
                data = tok.translate(_byte_translation()).encode("latin-1")
            except UnicodeEncodeError:
                # tokenizers' ByteLevel decoder falls back to the token's own UTF-8 bytes
                data = tok.encode("utf-8")
        self._token_bytes[token_id] = data
        return data

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja source), or ``None``."""
        return self._chat_templates.get("default") or (
            next(iter(self._chat_templates.values())) if self._chat_templates else None
        )

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named templates (``default``, ``tool_use`` …)."""
        return dict(self._chat_templates)

    def get_chat_template(self, chat_template: str | None = None, tools: Sequence[Any] | None = None) -> str:
        """Resolve which template source to use, like ``transformers``.

        ``chat_template`` may be a template name or Jinja source; without it the ``tool_use``
        template is chosen when tools are given and one exists, else ``default``.
        """
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if tools and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        tpl = self.chat_template
        if tpl is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        return tpl

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
        split_special_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's Jinja chat template (HF semantics).

        Args:
            messages: ``[{"role": ..., "content": ..., "tool_calls": [...]}, ...]``; keys whose
                value is ``None`` are dropped (OpenAI style ``content=None`` works).
            tools: JSON-schema dicts (``{"type": "function", "function": {...}}``) or Python
                functions with type hints and a Google-style docstring.
            add_generation_prompt: append ``<|im_start|>assistant\\n``.
            tokenize: return token ids instead of the string.
            continue_final_message: leave the last message open so the model continues it.
            chat_template: a template name or Jinja source overriding the tokenizer's.
            split_special_tokens: with ``tokenize=True``, encode control tokens as text.
            **kwargs: extra template variables; the special tokens map (``eos_token``…) is
                passed too, overridable.
        """
        source = self.get_chat_template(chat_template, tools)
        compiled = self._compiled_templates.get(source)
        if compiled is None:
            compiled = self._compiled_templates[source] = ChatTemplate(source)
        text = compiled.render(
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **{**self.special_tokens_map, **kwargs},
        )
        if tokenize:
            return self.encode(text, split_special_tokens=split_special_tokens)
        return text

    # ------------------------------------------------------------------ export
    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``directory``.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` then yields identical ids,
        decodes and chat-template renders. Returns the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        added = self.added_tokens_decoder
        cfg: dict[str, Any] = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in added.items()
            },
            "additional_special_tokens": [
                t.content
                for t in added.values()
                if t.special and t.content not in (self.eos_token, self.pad_token, self.bos_token)
            ],
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        if self._chat_templates:
            if list(self._chat_templates) == ["default"]:
                cfg["chat_template"] = self._chat_templates["default"]
            else:
                cfg["chat_template"] = [{"name": k, "template": v} for k, v in self._chat_templates.items()]
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        logger.info("saved tokenizer to %s", out)
        return out
