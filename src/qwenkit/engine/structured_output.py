"""Grammar-constrained decoding with xgrammar (`SamplingParams.structured_outputs`).

The engine owns one `StructuredOutputManager`: it builds the xgrammar compiler for the served
vocabulary on first use (seconds for Qwen's 151k tokens) and caches compiled grammars, so a
server can compile a request's grammar in a worker thread before submitting it and the engine
thread only looks it up. Each constrained sequence owns a `GrammarMatcher`, created when the
sequence is added and advanced on every token the engine appends (n > 1: one matcher per
sequence). `apply_grammar_bitmasks` masks a whole batch with one (B, ceil(V/32)) bitmask; once a
grammar is complete only the stop tokens (EOS) remain allowed.

Deviations from vLLM: JSON is generated without free whitespace (`", "` / `": "` separators),
which removes the whitespace loops small models fall into; strict mode is always on (objects
take no properties beyond the schema's), which only narrows what is produced.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

from qwenkit.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_PAD_FILLER = re.compile(r"\[PAD\d+\]")
TOOL_CALL_PREFIX = "<tool_call>\n"
TOOL_CALL_SUFFIX = "\n</tool_call>"
_SIZE_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
MAX_SCHEMA_SIZE_BOUND = 4096  # larger length/count bounds make grammar compilation explode
MAX_SCHEMA_DEPTH = 32
_CACHE_SIZE = 128  # compiled grammars kept (LRU)


class StructuredOutputError(ValueError):
    """The constraint cannot be compiled; `param` names the field, e.g. `structured_outputs.json`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'  # one character of a length-bounded string, as xgrammar writes it
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'  # an unescaped JSON string character


def _check_bounds(node: Any, param: str, path: str = "", depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise StructuredOutputError(f"'{param}' is nested deeper than {MAX_SCHEMA_DEPTH} levels", param)
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _SIZE_KEYWORDS and isinstance(value, (int, float)) and value > MAX_SCHEMA_SIZE_BOUND:
                raise StructuredOutputError(
                    f"'{param}{path}/{key}' is {value}; at most {MAX_SCHEMA_SIZE_BOUND} is supported", param
                )
            _check_bounds(value, param, f"{path}/{key}", depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_bounds(value, param, f"{path}/{i}", depth + 1)


def check_json_schema(schema: Any, param: str) -> None:
    """Reject what is not a valid JSON Schema (draft from `$schema`, default 2020-12), and
    length/count bounds too large to compile."""
    import jsonschema

    if not isinstance(schema, dict):
        raise StructuredOutputError(f"'{param}' must be a JSON Schema object", param)
    _check_bounds(schema, param)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        at = f" at /{where}" if where else ""
        raise StructuredOutputError(f"'{param}' is not a valid JSON Schema{at}: {e.message}", param) from None
    except Exception as e:  # unresolvable $ref, bad $schema URI, ...
        raise StructuredOutputError(f"'{param}' is not a usable JSON Schema: {e}", param) from None


def _schema(value: Mapping[str, Any] | str) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


def _cache_key(so: StructuredOutputsParams) -> str:
    kind = so.kinds()[0]
    value: Any = getattr(so, kind)
    if kind == "json":
        value = _schema(value)
    elif kind == "tool_calls":
        value = [[t.name, t.parameters] for t in value]
    return kind + ":" + json.dumps(value, sort_keys=True, ensure_ascii=False)


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer/vocabulary; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        n = len(tokenizer)
        special = set(getattr(tokenizer, "special_token_ids", ()))
        # Raw bytes per token. Special tokens and the vocabulary's `[PAD…]` fillers get b"", so
        # the grammar never emits them as text (xgrammar treats empty tokens as special).
        encoded = [
            b"" if i in special or _PAD_FILLER.fullmatch(tokenizer.id_to_token(i) or "") else tokenizer.token_bytes(i)
            for i in range(n)
        ]
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=2)
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutputsParams) -> Any:
        """The compiled grammar of `so`; StructuredOutputError naming the field if it cannot be."""
        import xgrammar as xgr

        if so.json_object:
            with self._lock:
                return self._compiler.compile_builtin_json_grammar()
        if so.json is not None:
            schema = _schema(so.json)
            check_json_schema(schema, "structured_outputs.json")
            grammar = self._from_schema(schema, "structured_outputs.json")
        elif so.tool_calls is not None:
            grammar = self._tool_calls(so)
        else:
            kind = so.kinds()[0]
            try:
                if so.regex is not None:
                    grammar = xgr.Grammar.from_regex(so.regex)
                elif so.grammar is not None:
                    grammar = xgr.Grammar.from_ebnf(so.grammar)
                else:
                    assert so.choice is not None
                    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
                    grammar = xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            except Exception as e:  # xgrammar raises RuntimeError/ValueError on a bad grammar
                raise StructuredOutputError(f"cannot build a grammar from 'structured_outputs.{kind}': {e}",
                                            f"structured_outputs.{kind}") from None  # fmt: skip
        with self._lock:
            return self._compiler.compile_grammar(grammar)

    @staticmethod
    def _from_schema(schema: dict[str, Any], param: str) -> Any:
        import xgrammar as xgr

        try:
            grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError on unsupported schemas
            raise StructuredOutputError(f"cannot build a grammar from '{param}': {e}", param) from None
        ebnf = str(grammar)
        if _BOUNDED_STRING_CHAR in ebnf:
            # xgrammar (0.2.x) lets a string with minLength/maxLength hold raw control characters,
            # which JSON forbids (RFC 8259 §7): exclude them as its unbounded strings do
            grammar = xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
        return grammar

    def _tool_calls(self, so: StructuredOutputsParams) -> Any:
        """Exactly one Hermes call to one of the functions."""
        import xgrammar as xgr

        assert so.tool_calls is not None
        prefix = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_PREFIX)}")
        suffix = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_SUFFIX)}")
        calls = []
        for i, spec in enumerate(so.tool_calls):
            param = f"structured_outputs.tool_calls.{i}.parameters"
            args = dict(spec.parameters) if spec.parameters else {"type": "object"}
            check_json_schema(args, param)
            schema = {
                "type": "object",
                "properties": {"name": {"const": spec.name}, "arguments": args},
                "required": ["name", "arguments"],
            }
            calls.append(self._from_schema(schema, param))
        body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
        return xgr.Grammar.concat(prefix, body, suffix)


class GrammarMatcher:
    """One sequence's position in its grammar, advanced token by token."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.failed = False  # a token the grammar rejected was appended (should not happen)

    def accept(self, token: int) -> None:
        if self.failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(int(token)):
            logger.warning("grammar rejected token %d; the constraint is lifted", token)
            self.failed = True

    @property
    def active(self) -> bool:
        return not self.failed and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def apply_grammar_bitmasks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
    """logits (B, V) -> fp32 logits with grammar-forbidden tokens at -inf (in place when fp32).

    One (B, ceil(V/32)) int32 bitmask is filled row by row by the active matchers, then applied
    in one call to those rows.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None and m.active]
    if not rows:
        return logits
    import xgrammar as xgr

    if logits.dtype != torch.float32:
        logits = logits.float()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        matchers[i].fill(bitmask, i)  # type: ignore[union-attr]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1], indices=rows)
    return logits


class StructuredOutputManager:
    """The engine's grammar compiler (built lazily) and a cache of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # guards the compiler's creation and the cache

    def compiler(self) -> GrammarCompiler:
        """ImportError without xgrammar; ValueError without a tokenizer."""
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs needs a tokenizer")
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._compiler

    def compile(self, so: StructuredOutputsParams) -> Any:
        """Compile (or fetch from the cache) the grammar of `so`. Thread-safe; may take a while,
        so servers call it from a worker thread before adding the request."""
        key = _cache_key(so)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self.compiler().compile(so)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, so: StructuredOutputsParams) -> GrammarMatcher:
        return GrammarMatcher(self.compile(so))
