"""Hermes-style tool calls (Qwen2.5): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

One incremental parser serves both modes: a non-streamed response is the streaming parser fed
the whole text at once, so streamed deltas always assemble to exactly the non-streamed result.
The parser is a character-level state machine, hence chunking-invariant: however the text is
split into deltas, the assembled output is the same.

Rules (they depend on the text only, never on how it was split):

- Text outside `<tool_call>` blocks is content. A run of whitespace is held back until the next
  non-whitespace character; a run directly followed by `<tool_call>` (or by the end, once a call
  was made) is dropped, so the whitespace the template puts around calls never leaks. A reply
  without any call comes back byte-for-byte.
- Tags never leak: a partial `<tool_call>` / `</tool_call>` is held back until it is resolved.
- A call is announced (index, id, name) as soon as its `"name"` string is complete; its
  `"arguments"` (or `"parameters"`) value is then streamed as the raw JSON text the model
  wrote, so the concatenated argument deltas are valid JSON whenever the model's were. A
  string-encoded arguments value (`"arguments": "{...}"`) is decoded once complete.
- A block that ends (or a response that stops) before a name is known is not a call: its raw
  text, tags included, becomes content (the honest fallback for malformed output). After the
  name was announced, anything malformed in the rest of the block is ignored; a call with no
  arguments gets `"{}"`.
- With `parallel_tool_calls=False` only the first call is kept; later blocks are dropped.
- Given the request's tool names, a response that *starts* with a bare call object (no tags,
  optionally in a ```json fence) naming one of them is a call too (see `_BareCall`).
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterable

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_ARG_KEYS = ("arguments", "parameters")
_SCALAR_END = ",}] \t\r\n"
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n")


def make_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCallChunk:
    """A streamed piece of one call: the header (`id`, `name`) comes once, with the first piece."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallChunk] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def _call(self, index: int) -> ToolCallChunk:
        if not self.tool_calls or self.tool_calls[-1].index != index:
            self.tool_calls.append(ToolCallChunk(index))
        return self.tool_calls[-1]


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ParsedToolCall]


class _ScanError(Exception):
    pass


class _ValueScanner:
    """Scans one JSON value character by character; knows when it is complete."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.kind: str | None = None  # "container" | "string" | "scalar"
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def feed(self, ch: str) -> bool:
        """Consume `ch`; False means the value (a scalar) ended just before it."""
        if self.kind is None:
            if ch in "{[":
                self.kind, self.depth = "container", 1
            elif ch == '"':
                self.kind, self.in_string = "string", True
            elif ch in "-0123456789tfn":
                self.kind = "scalar"
            else:
                raise _ScanError(ch)
            self.raw.append(ch)
            return True
        if self.kind == "scalar":
            if ch in _SCALAR_END:
                self.done = True
                return False
            self.raw.append(ch)
            return True
        self.raw.append(ch)
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.kind == "string":
                    self.done = True
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.done = True
        return True


class _Block:
    """State of one `<tool_call>` block: a scan of the top-level JSON object in its body."""

    def __init__(self, index: int, skip: bool, pre_ws: str) -> None:
        self.index = index
        self.pre_ws = pre_ws  # whitespace before the block: dropped unless the block is content
        self.skip = skip  # parallel_tool_calls=False and a call was already made
        self.raw = TOOL_CALL_START  # kept until the name is announced (fallback to content)
        self.state = "pre_object"
        self.key_chars: list[str] = []
        self.key_escape = False
        self.key: str | None = None
        self.value: _ValueScanner | None = None
        self.name: str | None = None
        self.announced = False
        self.args: _ValueScanner | None = None
        self.args_sent = 0  # characters of args.raw already emitted (container kind)
        self.args_final = False  # string/scalar arguments were emitted whole

    # --------------------------------------------------------------- JSON object scan
    def feed(self, ch: str) -> None:
        while True:
            if self.state in ("error", "done"):
                return
            try:
                if self._step(ch):
                    return
            except _ScanError:
                self.state = "error"
                return

    def _step(self, ch: str) -> bool:
        """Advance on `ch`; True when consumed (False: re-dispatch it in the new state)."""
        s = self.state
        if s == "value":
            assert self.value is not None
            consumed = self.value.feed(ch)
            if self.value.done:
                self._value_done()
            return consumed
        if ch.isspace() and s != "key":
            return True
        if s == "pre_object":
            if ch != "{":
                raise _ScanError(ch)
            self.state = "pre_key"
        elif s == "pre_key":
            if ch == "}":
                self.state = "done"
            elif ch == '"':
                self.state, self.key_chars, self.key_escape = "key", ['"'], False
            else:
                raise _ScanError(ch)
        elif s == "key":
            self.key_chars.append(ch)
            if self.key_escape:
                self.key_escape = False
            elif ch == "\\":
                self.key_escape = True
            elif ch == '"':
                try:
                    self.key = json.loads("".join(self.key_chars))
                except ValueError as e:
                    raise _ScanError(ch) from e
                self.state = "pre_colon"
        elif s == "pre_colon":
            if ch != ":":
                raise _ScanError(ch)
            self.state = "pre_value"
        elif s == "pre_value":
            self.value = _ValueScanner()
            if self.key in _ARG_KEYS and self.args is None:
                self.args = self.value
            self.state = "value"
            return False
        elif s == "post_value":
            if ch == ",":
                self.state = "pre_key"
            elif ch == "}":
                self.state = "done"
            else:
                raise _ScanError(ch)
        return True

    def _value_done(self) -> None:
        assert self.value is not None
        if self.key == "name" and self.name is None:
            if self.value.kind != "string":
                raise _ScanError("name")
            self.name = json.loads("".join(self.value.raw))
        self.state = "post_value"

    # --------------------------------------------------------------- emission
    def emit(self, out: ParsedDelta, new_id: Callable[[], str], finished: bool) -> None:
        """Put whatever became final into `out` (the header once, then argument text)."""
        if self.skip or self.name is None:
            return
        if not self.announced:
            self.announced = True
            self.raw = ""
            chunk = out._call(self.index)
            chunk.id, chunk.name = new_id(), self.name
        a = self.args
        if a is None or self.args_final:
            return
        if a.kind == "container":
            text = "".join(a.raw[self.args_sent :])
            self.args_sent = len(a.raw)
        elif a.done or finished:
            text = "".join(a.raw)
            if a.kind == "string" and a.done:
                decoded = json.loads(text)
                text = decoded if isinstance(decoded, str) else text
            self.args_final = True
        else:
            return
        if text:
            out._call(self.index).arguments += text


class _BareCall:
    """Small models often answer a tool request with the call's JSON but without the tags,
    bare or in a ```json fence. At the very start of a response, text shaped like that is held
    back until its JSON object completes: `{"name": <a requested tool>, "arguments": {...}}`
    is a call, anything else is handed back as ordinary text."""

    def __init__(self) -> None:
        self.stage = "lead"  # lead -> fence -> fence_ws -> json -> (post)
        self.buffer = ""
        self.fence = ""
        self.block = _Block(0, skip=False, pre_ws="")
        self.block.state = "pre_object"

    def feed(self, ch: str) -> str:
        """'more' | 'call' (object complete; name unchecked) | 'text' | 'post_done'."""
        self.buffer += ch
        st = self.stage
        if st == "post":  # after a call: drop whitespace and a closing ``` fence
            if ch.isspace() or (ch == "`" and self.buffer.count("`") <= 3):
                return "post_done" if self.buffer.count("`") == 3 else "more"
            return "text"
        if st in ("lead", "fence_ws") and ch.isspace():
            return "more"
        if st == "lead" and ch == "`":
            self.stage, self.fence = "fence", ch
            return "more"
        if st == "fence":
            self.fence += ch
            if ch == "\n":
                ok = _FENCE.fullmatch(self.fence) is not None
                self.stage = "fence_ws"
                return "more" if ok else "text"
            return "more" if len(self.fence) <= 16 and (ch == "`" or self.fence.startswith("```")) else "text"
        if st in ("lead", "fence_ws"):
            if ch != "{":
                return "text"
            self.stage = "json"
        self.block.feed(ch)
        if self.block.state == "error":
            return "text"
        return "call" if self.block.state == "done" and self.block.name is not None else (
            "text" if self.block.state == "done" else "more"
        )


class HermesToolParser:
    """Incremental Hermes tool-call parser: `feed(delta_text)` then `finish()` (module docstring
    has the rules). `result()` is the assembled message after `finish()`."""

    def __init__(
        self,
        *,
        parallel_tool_calls: bool = True,
        id_factory: Callable[[], str] = make_tool_call_id,
        tool_names: Iterable[str] | None = None,
    ) -> None:
        self.parallel_tool_calls = parallel_tool_calls
        self.id_factory = id_factory
        self.tool_names = frozenset(tool_names or ())
        # Bare-call detection runs on the start of the response when tool names are known.
        self._bare: _BareCall | None = _BareCall() if self.tool_names else None
        self._tag = ""  # a partial start (outside) or end (inside a block) tag, held back
        self._ws = ""  # held-back whitespace run (outside blocks)
        self._block: _Block | None = None
        self._num_calls = 0
        self._finished = False
        self._content: list[str] = []
        self._calls: list[ParsedToolCall] = []

    # --------------------------------------------------------------- public
    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise ValueError("parser already finished")
        out = ParsedDelta()
        for ch in text:
            if self._bare is not None:
                self._bare_char(ch, out)
            else:
                self._char(ch, out)
        if self._block is not None:
            self._block.emit(out, self.id_factory, finished=False)
        self._record(out)
        return out

    def finish(self) -> ParsedDelta:
        """End of the response: resolve held-back text and an unterminated block."""
        out = ParsedDelta()
        if self._finished:
            return out
        self._finished = True
        if self._bare is not None:
            bare, self._bare = self._bare, None
            if bare.stage != "post":  # an unfinished bare object is text
                for ch in bare.buffer:
                    self._char(ch, out)
        pending, self._tag = self._tag, ""
        if self._block is not None:
            for ch in pending:  # a partial end tag at the very end is body text
                self._block_char(ch, out)
            self._end_block(out, finished=True)
        else:
            for ch in pending:
                self._text_char(ch, out)
        if self._ws and not self._num_calls:
            out.content += self._ws
        self._ws = ""
        self._record(out)
        return out

    def result(self) -> ExtractedToolCalls:
        content = "".join(self._content)
        if self._calls and not content:
            return ExtractedToolCalls(None, list(self._calls))
        return ExtractedToolCalls(content, list(self._calls))

    @property
    def num_tool_calls(self) -> int:
        return len(self._calls)

    # --------------------------------------------------------------- characters
    def _char(self, ch: str, out: ParsedDelta) -> None:
        tag = TOOL_CALL_END if self._block is not None else TOOL_CALL_START
        self._tag += ch
        if tag.startswith(self._tag):
            if self._tag == tag:
                self._tag = ""
                if self._block is None:
                    self._begin_block()
                else:
                    self._end_block(out, finished=False)
            return
        # Not a tag: the first held character is plain; the rest may still start a tag.
        pending, self._tag = self._tag, ""
        if self._block is not None:
            self._block_char(pending[0], out)
        else:
            self._text_char(pending[0], out)
        for c in pending[1:]:
            self._char(c, out)

    def _bare_char(self, ch: str, out: ParsedDelta) -> None:
        bare = self._bare
        assert bare is not None
        verdict = bare.feed(ch)
        if verdict == "more":
            return
        self._bare = None
        if verdict == "call" and bare.block.name in self.tool_names:
            block = bare.block
            block.emit(out, self.id_factory, finished=True)
            if block.args is None:
                out._call(block.index).arguments += "{}"
            self._num_calls += 1
            self._bare = bare  # keep eating a closing fence
            bare.stage, bare.buffer = "post", ""
            return
        if verdict == "post_done":
            return
        for c in bare.buffer:  # not a bare call: the text goes through the normal path
            self._char(c, out)

    def _text_char(self, ch: str, out: ParsedDelta) -> None:
        if ch.isspace():
            self._ws += ch
        else:
            out.content += self._ws + ch
            self._ws = ""

    def _block_char(self, ch: str, out: ParsedDelta) -> None:
        block = self._block
        assert block is not None
        if not block.announced:
            block.raw += ch
        if not block.skip:
            block.feed(ch)

    def _begin_block(self) -> None:
        skip = not self.parallel_tool_calls and self._num_calls > 0
        self._block = _Block(self._num_calls, skip, self._ws)
        self._ws = ""

    def _end_block(self, out: ParsedDelta, finished: bool) -> None:
        block = self._block
        assert block is not None
        self._block = None
        if block.skip:
            return
        block.emit(out, self.id_factory, finished=True)
        if block.announced:
            if block.args is None:
                out._call(block.index).arguments += "{}"
            self._num_calls += 1
            return
        # never became a call: the raw block is content
        out.content += block.pre_ws + block.raw + ("" if finished else TOOL_CALL_END)

    def _record(self, out: ParsedDelta) -> None:
        if out.content:
            self._content.append(out.content)
        for chunk in out.tool_calls:
            if chunk.name is not None:
                assert chunk.id is not None and chunk.index == len(self._calls)
                self._calls.append(ParsedToolCall(chunk.id, chunk.name, ""))
            self._calls[chunk.index].arguments += chunk.arguments


def parse_tool_calls(
    text: str,
    *,
    parallel_tool_calls: bool = True,
    id_factory: Callable[[], str] = make_tool_call_id,
    tool_names: Iterable[str] | None = None,
) -> ExtractedToolCalls:
    """Non-streaming extraction: the streaming parser fed the whole text at once."""
    parser = HermesToolParser(parallel_tool_calls=parallel_tool_calls, id_factory=id_factory, tool_names=tool_names)
    parser.feed(text)
    parser.finish()
    return parser.result()
