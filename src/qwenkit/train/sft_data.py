"""Tokenize training records into :class:`Example` s: ``input_ids`` plus ``labels`` (-100 = no loss).

Labels follow the Hugging Face convention: aligned with ``input_ids`` (not shifted);
:func:`qwenkit.train.packing.collate` shifts them per document into the trainer's targets.

The masks are TRL 1.16's ``SFTTrainer`` masks (``tests/test_train_data.py`` checks equality):

* ``{"messages", "tools"?}``: rendered with the model's own chat template; loss on the assistant
  turns only (TRL's ``assistant_only_loss=True``). An assistant turn is everything its message
  adds to the rendered conversation after the role header (for Qwen2.5: the ``\\n`` after
  ``<|im_start|>assistant``, the content / tool calls, ``<|im_end|>`` and the ``\\n`` after it),
  found by rendering the conversation up to and including each assistant message; a token is
  trained when it overlaps a turn. This needs a prefix-preserving template (Qwen2.5's is).
* ``{"prompt", "completion"}``: loss on the completion only (TRL's ``completion_only_loss``).
  Conversational (both message lists): the prompt is rendered with the generation prompt, the
  whole with the completion, and the completion starts where the two token sequences diverge.
  Plain strings: EOS is appended to the completion unless it already ends with it.
* ``{"text"}``: loss on every token; EOS is appended unless the text already ends with it.
  Like TRL the EOS is the tokenizer's ``eos_token`` (``<|im_end|>`` for Qwen2.5-Instruct); pass
  ``eos_token="<|endoftext|>"`` for base-model pretraining.

Sequences longer than ``max_length`` are truncated (keep the first ``max_length`` tokens, TRL's
``keep_start``), dropped, or split into ``max_length`` pieces; examples left with no loss tokens
are dropped. :class:`TokenizeStats` counts each.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qwenkit.data.readers import Record, record_format
from qwenkit.errors import DataError
from qwenkit.tokenizer import Tokenizer

from .batch import IGNORE_INDEX

__all__ = [
    "Example",
    "Overflow",
    "TokenizeStats",
    "fit_length",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "tokenize_record",
    "tokenize_records",
    "tokenize_text",
]

logger = logging.getLogger(__name__)

Overflow = Literal["truncate", "drop", "split"]


@dataclass
class Example:
    """One training document: token ids and their labels (same length; -100 = no loss).

    Either field may be a list or a 1-D numpy array (shard documents are memory-mapped arrays).
    """

    input_ids: Sequence[int]
    labels: Sequence[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens the model is trained to predict: labels past the first (nothing predicts token 0)."""
        return int((np.asarray(self.labels[1:]) != IGNORE_INDEX).sum())


@dataclass
class TokenizeStats:
    """What :func:`tokenize_records` / :func:`fit_length` did."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0
    split_documents: int = 0
    split_pieces: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def log(self) -> None:
        logger.info(
            "tokenized %d records -> %d examples (%d tokens, %d with loss); formats %s; truncated %d, dropped "
            "%d too long and %d with no loss tokens; split %d documents into %d pieces",
            self.records, self.examples, self.tokens, self.loss_tokens, self.formats, self.truncated,
            self.dropped_too_long, self.dropped_no_loss, self.split_documents, self.split_pieces,
        )  # fmt: skip


# ---------------------------------------------------------------------------- formats
def _tools(tools: Any) -> list[Any] | None:
    if isinstance(tools, str):  # datasets often store the schemas as a JSON string
        tools = json.loads(tools)
    return tools or None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    **template_kwargs: Any) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The rendered conversation and the character spans of its assistant turns (see the module doc).

    Raises ``ValueError`` when the chat template does not render each prefix of the conversation
    as a prefix of the whole, or a conversation starts with an assistant message.
    """

    def render(msgs: Sequence[Mapping[str, Any]], gen: bool) -> str:
        out = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, **template_kwargs)
        assert isinstance(out, str)
        return out

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant message (nothing to render before it)")
        before, prompted, upto = render(messages[:i], False), render(messages[:i], True), render(messages[: i + 1], False)
        header = prompted[len(before):].rstrip()  # '<|im_start|>assistant': the generation prompt minus whitespace
        if not (prompted.startswith(before) and upto.startswith(before + header) and full.startswith(upto)):
            raise ValueError(
                f"the chat template does not render message {i}'s prefix of the conversation as a prefix of the "
                "whole; cannot locate the assistant turns"
            )
        spans.append((len(before) + len(header), len(upto)))
    return full, spans


def tokenize_messages(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Any = None,
                      **template_kwargs: Any) -> Example:  # fmt: skip
    """A conversation with loss on the assistant turns only (TRL ``assistant_only_loss``)."""
    text, spans = assistant_spans(tokenizer, messages, _tools(tools), **template_kwargs)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (start, end) in enumerate(enc.offsets):  # offsets and spans are both in order
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            labels[t] = ids[t]
    return Example(ids, labels)


def tokenize_prompt_completion(tokenizer: Tokenizer, prompt: str | Sequence[Mapping[str, Any]],
                               completion: str | Sequence[Mapping[str, Any]], tools: Any = None, *,
                               eos_token: str | None = None, **template_kwargs: Any) -> Example:  # fmt: skip
    """Prompt-completion with loss on the completion only (TRL ``completion_only_loss``).

    Both strings (EOS appended to the completion) or both message lists (chat template).
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings or both be message lists")
    if isinstance(prompt, str):
        assert isinstance(completion, str)
        eos = tokenizer.eos_token if eos_token is None else eos_token
        if eos and not completion.endswith(eos):
            completion += eos
        prompt_ids = tokenizer.encode(prompt)
        ids = tokenizer.encode(prompt + completion)
    else:
        tools = _tools(tools)
        prompt_ids = tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                                   **template_kwargs)  # fmt: skip
        ids = tokenizer.apply_chat_template(list(prompt) + list(completion), tools=tools, add_generation_prompt=False,
                                            tokenize=True, **template_kwargs)  # fmt: skip
    assert isinstance(ids, list) and isinstance(prompt_ids, list)
    n = _common_prefix(prompt_ids, ids)
    if n < len(prompt_ids):
        logger.warning("the tokenized prompt is not a prefix of prompt + completion; the completion starts where "
                       "they diverge (%d of %d prompt tokens)", n, len(prompt_ids))  # fmt: skip
    return Example(ids, [IGNORE_INDEX] * n + ids[n:])


def tokenize_text(tokenizer: Tokenizer, text: str, *, eos_token: str | None = None) -> Example:
    """Plain text with loss on every token; EOS appended unless already there (TRL's behaviour)."""
    eos = tokenizer.eos_token if eos_token is None else eos_token
    if eos and not text.endswith(eos):
        text += eos
    ids = tokenizer.encode(text)
    return Example(ids, list(ids))


def tokenize_record(record: Record | Mapping[str, Any], tokenizer: Tokenizer, *, text_field: str = "text",
                    eos_token: str | None = None) -> Example:  # fmt: skip
    """Tokenize one record of any supported format; errors name the record's file and line."""
    rec = record if isinstance(record, Record) else Record(dict(record), "<memory>", 0, "record")
    fmt = record_format(rec, text_field)
    d = rec.data
    kwargs = dict(d.get("chat_template_kwargs") or {})
    try:
        if fmt == "messages":
            return tokenize_messages(tokenizer, d["messages"], d.get("tools"), **kwargs)
        if fmt == "prompt_completion":
            return tokenize_prompt_completion(tokenizer, d["prompt"], d["completion"], d.get("tools"),
                                              eos_token=eos_token, **kwargs)  # fmt: skip
        return tokenize_text(tokenizer, d[text_field], eos_token=eos_token)
    except DataError:
        raise
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise rec.error(f"cannot tokenize the {fmt} record: {e}") from e
    except Exception as e:  # jinja2 errors from the chat template (e.g. raise_exception)
        if type(e).__module__.startswith("jinja2"):
            raise rec.error(f"the chat template failed on this record: {e}") from e
        raise


# ---------------------------------------------------------------------------- length
def fit_length(example: Example, max_length: int, overflow: Overflow = "truncate",
               stats: TokenizeStats | None = None) -> list[Example]:  # fmt: skip
    """Make an example fit ``max_length``; returns 0, 1 or (``split``) several examples.

    ``truncate`` keeps the first ``max_length`` tokens; ``drop`` drops the example; ``split`` cuts
    it into pieces of at most ``max_length`` tokens that overlap by one token, so every next-token
    prediction of the document is trained exactly once (a piece's first token is only context;
    its label is set to -100). Examples with no loss tokens are dropped. Counts go to ``stats``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if overflow not in ("truncate", "drop", "split"):
        raise ValueError(f"overflow must be 'truncate', 'drop' or 'split', got {overflow!r}")
    stats = stats if stats is not None else TokenizeStats()
    pieces = [example]
    n = len(example)
    if n > max_length:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return []
        if overflow == "truncate":
            stats.truncated += 1
            pieces = [Example(example.input_ids[:max_length], example.labels[:max_length])]
        else:
            stride = max_length - 1
            pieces = []
            for start in range(0, n - 1, stride):
                labels = list(example.labels[start : start + max_length])
                if start:
                    labels[0] = IGNORE_INDEX
                pieces.append(Example(example.input_ids[start : start + max_length], labels))
            stats.split_documents += 1
            stats.split_pieces += len(pieces)
    out = []
    for p in pieces:
        # Like TRL, examples left fully masked (e.g. a prompt filling max_length) carry no loss.
        loss = p.num_loss_tokens
        if loss == 0:
            stats.dropped_no_loss += 1
            continue
        stats.examples += 1
        stats.tokens += len(p)
        stats.loss_tokens += loss
        out.append(p)
    return out


def tokenize_records(records: Iterable[Record | Mapping[str, Any]], tokenizer: Tokenizer, *,
                     max_length: int, overflow: Overflow = "truncate", text_field: str = "text",
                     eos_token: str | None = None) -> tuple[list[Example], TokenizeStats]:  # fmt: skip
    """Tokenize records (any mix of formats) and fit them to ``max_length``; logs and returns the counts."""
    stats = TokenizeStats()
    examples: list[Example] = []
    for rec in records:
        stats.records += 1
        ex = tokenize_record(rec, tokenizer, text_field=text_field, eos_token=eos_token)
        fmt = record_format(rec if isinstance(rec, Record) else Record(dict(rec), "<memory>", 0), text_field)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        examples.extend(fit_length(ex, max_length, overflow, stats))
    if stats.records == 0:
        raise DataError("no records to tokenize")
    stats.log()
    if not examples:
        raise DataError(f"all {stats.records} records were dropped (too long or no loss tokens); "
                        f"check max_length={max_length} and overflow={overflow!r}")  # fmt: skip
    return examples, stats
