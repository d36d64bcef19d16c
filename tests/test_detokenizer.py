"""Streaming detokenizer: deltas concatenate to the full decode, never a torn UTF-8 character."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from qwenkit.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.test_tokenizer import CORPUS, control_base, load_ours_dir, load_ref_dir

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def ours(qwen_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer, and (slow) the real one."""
    return load_ours_dir(qwen_tokenizer_dir)


def _stream(tok: Any, ids: list[int], chunks: list[int] | None = None, **kw: Any) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, **kw)
    deltas: list[str] = []
    if chunks is None:
        for i in ids:
            deltas.append(detok.add(i))
    else:
        pos = 0
        for c in chunks:
            deltas.append(detok.add(ids[pos : pos + c]))
            pos += c
        assert pos >= len(ids)
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    out = []
    while sum(out) < n:
        out.append(rng.randint(1, 7))
    return out


def _check(tok: Any, ids: list[int], deltas: list[str], tail: str, skip: bool) -> None:
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas + [tail])
    # a delta that ends in U+FFFD must be a real U+FFFD of the full text at that position
    pos = 0
    for d in deltas:
        pos += len(d)
        if d.endswith(REPLACEMENT):
            assert full[pos - 1] == REPLACEMENT


@pytest.mark.parametrize("mode", ["bytes", "offsets"])
@pytest.mark.parametrize("skip", [False, True])
def test_corpus_token_by_token(ours: Tokenizer, mode: str, skip: bool) -> None:
    for s in CORPUS[::3]:
        ids = ours.encode(s)
        deltas, tail = _stream(ours, ids, mode=mode, skip_special_tokens=skip)
        _check(ours, ids, deltas, tail, skip)


@pytest.mark.parametrize("mode", ["bytes", "offsets"])
def test_corpus_random_chunks(ours: Tokenizer, mode: str) -> None:
    rng = random.Random(5)
    for s in CORPUS[1::3]:
        ids = ours.encode(s)
        skip = rng.random() < 0.5
        deltas, tail = _stream(ours, ids, _random_chunks(rng, len(ids)), mode=mode, skip_special_tokens=skip)
        _check(ours, ids, deltas, tail, skip)


def test_multibyte_chars_are_held_back(ours: Tokenizer) -> None:
    # rare CJK / emoji are split into several byte-level tokens
    text = "𠀀𪚖 👨‍👩‍👧‍👦 🧑🏻‍🤝‍🧑🏿 \U000e0041"
    ids = ours.encode(text)
    assert len(ids) > len(text.split())
    torn = [i for i in ids if ours.token_bytes(i).decode("utf-8", "replace").count(REPLACEMENT)]
    assert torn, "expected tokens holding partial UTF-8 sequences"
    for mode in ("bytes", "offsets"):
        deltas, tail = _stream(ours, ids, mode=mode)
        assert "".join(deltas) == text and tail == ""
        assert "" in deltas  # something was held back
        assert all(REPLACEMENT not in d for d in deltas)


@pytest.mark.parametrize("mode", ["bytes", "offsets"])
def test_invalid_utf8_soups(ours: Tokenizer, mode: str) -> None:
    """Random ids (lone continuation bytes, truncated sequences, control tokens, [PAD] fillers)."""
    rng = random.Random(9)
    byte_tokens = [i for i in range(ours.vocab_size) if len(ours.token_bytes(i)) == 1 and ours.token_bytes(i)[0] >= 0x80]
    assert len(byte_tokens) == 128
    base = control_base(ours)
    word = ours.encode(" Hello")
    for _ in range(300):
        ids = [
            rng.choice([rng.choice(byte_tokens), rng.randrange(ours.vocab_size), rng.randrange(base, base + 27), *word])
            for _ in range(rng.randint(1, 25))
        ]
        skip = rng.random() < 0.5
        chunks = _random_chunks(rng, len(ids)) if rng.random() < 0.5 else None
        deltas, tail = _stream(ours, ids, chunks, mode=mode, skip_special_tokens=skip)
        _check(ours, ids, deltas, tail, skip)


def test_incomplete_tail_flushes_replacement(ours: Tokenizer) -> None:
    # the first byte of "中" (E4) alone: held back while streaming, U+FFFD at flush
    e4 = next(i for i in range(ours.vocab_size) if ours.token_bytes(i) == b"\xe4")
    for mode in ("bytes", "offsets"):
        detok = IncrementalDetokenizer(ours, mode=mode)  # type: ignore[arg-type]
        assert detok.add([*ours.encode("Hello"), e4]) == "Hello"
        assert detok.flush() == REPLACEMENT == ours.decode([e4])
        assert detok.finished
        with pytest.raises(ValueError):
            detok.add(1)
        assert detok.flush() == ""


def test_work_is_windowed(ours: Tokenizer) -> None:
    """The offsets mode only ever decodes a few ids at a time, however long the stream."""

    class Counting:
        def __init__(self, tok: Tokenizer) -> None:
            self.tok = tok
            self.max_len = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            self.max_len = max(self.max_len, len(ids))
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = " ".join(CORPUS[:300])
    ids = ours.encode(text)
    assert len(ids) > 3000
    counting = Counting(ours)
    deltas, tail = _stream(counting, ids)
    assert "".join(deltas) + tail == ours.decode(ids)
    assert counting.max_len <= 12


def test_duck_typed_transformers_tokenizer(qwen_tokenizer_dir: Path, ours: Tokenizer) -> None:
    ref = load_ref_dir(qwen_tokenizer_dir)
    ids = ours.encode("流式输出 😀 <tool_call>{}</tool_call><|im_end|>")
    detok = IncrementalDetokenizer(ref, skip_special_tokens=True)
    assert detok.mode == "offsets"
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == ref.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)


def test_bad_arguments(ours: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(ours, mode="fast")  # type: ignore[arg-type]

    class DecodeOnly:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return ""

    with pytest.raises(ValueError):
        IncrementalDetokenizer(DecodeOnly(), mode="bytes")
    detok = IncrementalDetokenizer(ours)
    hello = ours.encode("Hello")
    with pytest.raises(ValueError):
        detok.add([hello[0], ours.vocab_size])
    with pytest.raises(ValueError):
        detok.add(-1)
    assert detok.ids == [] and detok.add([]) == ""
    assert "".join(detok.add(i) for i in hello) == "Hello" and detok.ids == hello
