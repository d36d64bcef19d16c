"""Grammar-constrained decoding with xgrammar: JSON object / JSON schema output and forced tool
calls (`tool_choice` "required" or a named function).

Each constrained sequence owns a `GrammarLogitsProcessor` holding an xgrammar matcher. Before a
token is sampled, the matcher's next-token bitmask sets every token the grammar cannot accept
to -inf; once the grammar is complete only the stop tokens (EOS) remain. `apply_grammar_bitmasks`
does this for a whole batch with one (B, ceil(V/32)) int32 bitmask and one masking call; the
processor is also a plain per-row logits processor, `(output_token_ids, logits_row) -> logits_row`
(vLLM's per-request `logits_processors` contract), for engines that call those.

Deviations from vLLM: JSON is generated without free whitespace (`", "` / `": "` separators),
which removes the whitespace loops small models fall into; strict mode is always on (objects
take no properties beyond the schema's), which only narrows what is produced.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

_PAD_FILLER = re.compile(r"\[PAD\d+\]")
TOOL_CALL_PREFIX = "<tool_call>\n"
TOOL_CALL_SUFFIX = "\n</tool_call>"


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


_SIZE_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
MAX_SCHEMA_SIZE_BOUND = 4096  # larger length/count bounds make grammar compilation explode
MAX_SCHEMA_DEPTH = 32


def _check_bounds(node: Any, param: str, path: str = "", depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"'{param}' is nested deeper than {MAX_SCHEMA_DEPTH} levels", param)
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _SIZE_KEYWORDS and isinstance(value, (int, float)) and value > MAX_SCHEMA_SIZE_BOUND:
                raise GrammarError(
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
        raise GrammarError(f"'{param}' must be a JSON Schema object", param)
    _check_bounds(schema, param)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"'{param}' is not a valid JSON Schema{f' at /{where}' if where else ''}: {e.message}", param) from None
    except Exception as e:  # unresolvable $ref, bad $schema URI, ...
        raise GrammarError(f"'{param}' is not a usable JSON Schema: {e}", param) from None


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer/vocabulary; thread-safe, caches compiled grammars."""

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
            encoded,
            xgr.VocabType.RAW,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=2)
        self._lock = threading.Lock()

    def _grammar_from_schema(self, schema: dict[str, Any], param: str) -> Any:
        import xgrammar as xgr

        try:
            return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError on unsupported schemas
            raise GrammarError(f"cannot build a grammar from '{param}': {e}", param) from None

    def _compile(self, grammar: Any) -> Any:
        with self._lock:
            return self._compiler.compile_grammar(grammar)

    def json_object(self) -> Any:
        with self._lock:
            return self._compiler.compile_builtin_json_grammar()

    def json_schema(self, schema: dict[str, Any], param: str) -> Any:
        check_json_schema(schema, param)
        return self._compile(self._grammar_from_schema(schema, param))

    def tool_calls(self, tools: Sequence[tuple[str, dict[str, Any] | None]], param: str) -> Any:
        """Exactly one Hermes call to one of `tools` ((name, parameters schema) pairs)."""
        import xgrammar as xgr

        prefix = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_PREFIX)}")
        suffix = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_SUFFIX)}")
        calls = []
        for i, (name, parameters) in enumerate(tools):
            args = parameters if parameters else {"type": "object"}
            schema = {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": args},
                "required": ["name", "arguments"],
            }
            calls.append(self._grammar_from_schema(schema, f"{param}.{i}.function.parameters"))
        body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
        return self._compile(xgr.Grammar.concat(prefix, body, suffix))


class GrammarLogitsProcessor:
    """Masks one sequence's logits to its grammar. Call it with the sequence's output token ids
    so far; it accepts the ones it has not seen, so calling twice at one position is harmless.

    Contract: one processor per sequence (a request with n > 1 needs n processors).
    """

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.num_accepted = 0
        self.failed = False  # a token the grammar rejected was appended (should not happen)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V/32)) int32

    def advance(self, output_token_ids: Sequence[int]) -> None:
        for token in output_token_ids[self.num_accepted :]:
            self.num_accepted += 1
            if self.failed or self.matcher.is_terminated():
                continue
            if not self.matcher.accept_token(int(token)):
                logger.warning("grammar rejected token %d; the constraint is lifted", token)
                self.failed = True

    @property
    def active(self) -> bool:
        return not self.failed and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        import xgrammar as xgr

        self.advance(output_token_ids)
        if not self.active:
            return logits
        self.fill(self._bitmask, 0)
        row = logits.float() if logits.dtype != torch.float32 else logits
        view = row.view(1, -1)  # (1, V)
        xgr.apply_token_bitmask_inplace(view, self._bitmask, vocab_size=self.vocab_size)
        return row


def apply_grammar_bitmasks(
    logits: torch.Tensor,
    processors: Sequence[GrammarLogitsProcessor | None],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Batched masking: logits (B, V) -> logits with grammar-forbidden tokens at -inf.

    One bitmask of shape (B, ceil(V/32)) is filled row by row by the matchers, then applied in
    one call to the rows that have an active grammar. Returns fp32 logits (a copy only if the
    input was another dtype).
    """
    import xgrammar as xgr

    rows: list[int] = []
    for i, proc in enumerate(processors):
        if proc is not None:
            proc.advance(output_token_ids[i])
            if proc.active:
                rows.append(i)
    if not rows:
        return logits
    if logits.dtype != torch.float32:
        logits = logits.float()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # (B, ceil(V/32))
    for i in rows:
        processors[i].fill(bitmask, i)  # type: ignore[union-attr]
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
    return logits
