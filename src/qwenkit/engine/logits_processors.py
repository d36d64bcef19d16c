"""The engine's logits processors: `logit_bias`, `allowed_token_ids`, `bad_words`, `min_tokens`
and `structured_outputs` (vLLM semantics), applied to a whole batch per step.

State: a `LogitsSpec` per request (token-id tensors built once in `add_request`: bias ids and
values, allowed ids, banned ids, tokenized bad words, stop ids, the compiled grammar) and a
`SequenceLogitsState` per sequence (the spec plus its own grammar matcher, advanced by the
engine on every appended token).

Per step, in the model runner:
1. `apply_grammar` masks the grammar rows with one xgrammar bitmask (before log-probs are
   taken, as vLLM's runner does);
2. the sampler takes the raw log-probs, then `apply_logits_processors` adds one (B, V) tensor:
   the biases, -inf outside `allowed_token_ids`, -inf on banned tokens (single-token bad words;
   the last token of a multi-token bad word whose prefix ends the output; the stop ids while
   fewer than `min_tokens` tokens were generated). Rows are visited in Python, the vocabulary
   never is: every row contributes index tensors that are concatenated and scattered at once.
A row left with no finite logit (e.g. `allowed_token_ids` disjoint from the grammar) gets its
grammar-masked logits back for that step, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qwenkit.engine.structured_output import GrammarMatcher, StructuredOutputManager, apply_grammar_bitmasks
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def bad_words_token_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """vLLM's tokenization of `bad_words`: each word as is (left-stripped) and, when that gives
    a different first token of the same length, with a leading space (the mid-text form)."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def _ids(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(sorted(set(values)), dtype=torch.long, device=device)


@dataclass(frozen=True)
class LogitsSpec:
    """One request's processors as tensors (shared read-only by its `n` sequences)."""

    bias_ids: torch.Tensor | None = None  # (K,) long
    bias_values: torch.Tensor | None = None  # (K,) fp32
    allowed_ids: torch.Tensor | None = None  # (A,) long
    banned_ids: torch.Tensor | None = None  # (W,) long: single-token bad words
    bad_sequences: tuple[tuple[int, ...], ...] = ()  # multi-token bad words
    min_tokens: int = 0
    stop_ids: torch.Tensor | None = None  # banned while fewer than min_tokens were generated
    grammar: Any = None  # compiled xgrammar grammar
    history_len: int = 0  # output tokens the multi-token bad words look back at

    @classmethod
    def from_params(
        cls,
        params: SamplingParams,
        *,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        tokenizer: Any,
        structured: StructuredOutputManager | None,
        device: torch.device,
    ) -> LogitsSpec | None:
        """None when the request uses no processor. ValueError (naming the field) for token ids
        outside the vocabulary, or bad words / grammars without a tokenizer."""
        kw: dict[str, Any] = {}
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= vocab_size]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            ids = list(params.logit_bias)
            kw["bias_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
            kw["bias_values"] = torch.tensor([float(params.logit_bias[t]) for t in ids], device=device)
        if params.allowed_token_ids is not None:
            bad = [t for t in params.allowed_token_ids if t >= vocab_size]
            if bad:
                raise ValueError(f"allowed_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            kw["allowed_ids"] = _ids(params.allowed_token_ids, device)
        if params.bad_words:
            if tokenizer is None:
                raise ValueError("bad_words needs a tokenizer")
            seqs = [s for s in bad_words_token_ids(tokenizer, params.bad_words) if s]
            single = [s[0] for s in seqs if len(s) == 1 and s[0] < vocab_size]
            if single:
                kw["banned_ids"] = _ids(single, device)
            multi = tuple(dict.fromkeys(tuple(s) for s in seqs if len(s) > 1))
            if multi:
                kw["bad_sequences"] = multi
                kw["history_len"] = max(len(s) for s in multi) - 1
        if params.min_tokens > 0:
            stops = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
            stops = [t for t in stops if 0 <= t < vocab_size]
            if stops:
                kw["min_tokens"] = params.min_tokens
                kw["stop_ids"] = _ids(stops, device)
        if params.structured_outputs is not None:
            if structured is None:
                raise ValueError("structured_outputs needs a tokenizer")
            kw["grammar"] = structured.compile(params.structured_outputs)
        return cls(**kw) if kw else None

    def new_state(self) -> SequenceLogitsState:
        return SequenceLogitsState(self, GrammarMatcher(self.grammar) if self.grammar is not None else None)

    def banned(self, num_output: int, recent: Sequence[int], device: torch.device) -> list[torch.Tensor]:
        """Token ids banned at the next step, given the output length and its last tokens."""
        out = [t for t in (self.banned_ids,) if t is not None]
        if self.stop_ids is not None and num_output < self.min_tokens:
            out.append(self.stop_ids)
        hits = [
            s[-1] for s in self.bad_sequences
            if len(s) - 1 <= num_output and tuple(recent[len(recent) - len(s) + 1 :]) == s[:-1]
        ]  # fmt: skip
        if hits:
            out.append(torch.tensor(hits, dtype=torch.long, device=device))
        return out


@dataclass
class SequenceLogitsState:
    """One sequence's processors: the request's spec and its own grammar matcher."""

    spec: LogitsSpec
    matcher: GrammarMatcher | None = None

    def accept(self, token: int) -> None:
        """Advance the grammar by a token the engine appended to this sequence."""
        if self.matcher is not None:
            self.matcher.accept(token)


def apply_grammar(logits: torch.Tensor, states: Sequence[SequenceLogitsState | None]) -> torch.Tensor:
    """Mask every grammar row of logits (B, V) (fp32 result)."""
    return apply_grammar_bitmasks(logits, [s.matcher if s is not None else None for s in states])


def apply_logits_processors(
    logits: torch.Tensor,
    states: Sequence[SequenceLogitsState | None],
    num_output: Sequence[int],
    recent: Sequence[Sequence[int]],
) -> torch.Tensor:
    """logits (B, V) fp32 -> logits + one (B, V) additive tensor of biases and -inf masks.

    `num_output[i]`: tokens row i generated so far; `recent[i]`: its last output tokens (at least
    `states[i].spec.history_len` of them when there are that many).
    """
    b, v = logits.shape
    dev = logits.device
    bias_rows: list[torch.Tensor] = []
    bias_cols: list[torch.Tensor] = []
    bias_vals: list[torch.Tensor] = []
    ban_rows: list[torch.Tensor] = []
    ban_cols: list[torch.Tensor] = []
    allowed_rows: list[int] = []
    allowed_cols: list[torch.Tensor] = []
    for i, state in enumerate(states):
        if state is None:
            continue
        spec = state.spec
        if spec.bias_ids is not None and spec.bias_values is not None:
            bias_rows.append(torch.full_like(spec.bias_ids, i))
            bias_cols.append(spec.bias_ids)
            bias_vals.append(spec.bias_values)
        for ids in spec.banned(num_output[i], recent[i], dev):
            ban_rows.append(torch.full_like(ids, i))
            ban_cols.append(ids)
        if spec.allowed_ids is not None:
            allowed_rows.append(i)
            allowed_cols.append(spec.allowed_ids)
    if not (bias_rows or ban_rows or allowed_rows):
        return logits
    additive = torch.zeros(b, v, dtype=logits.dtype, device=dev)
    if bias_rows:
        additive.index_put_((torch.cat(bias_rows), torch.cat(bias_cols)), torch.cat(bias_vals), accumulate=True)
    if allowed_rows:
        keep = torch.zeros(len(allowed_rows), v, dtype=torch.bool, device=dev)
        which = torch.cat([torch.full_like(c, j) for j, c in enumerate(allowed_cols)])
        keep[which, torch.cat(allowed_cols)] = True
        rows = torch.tensor(allowed_rows, device=dev)
        additive[rows] = additive[rows].masked_fill(~keep, float("-inf"))
    if ban_rows:
        additive[torch.cat(ban_rows), torch.cat(ban_cols)] = float("-inf")
    out = logits + additive
    dead = ~torch.isfinite(out).any(dim=-1)  # (B,)
    if bool(dead.any()):
        logger.warning("logits processors left no allowed token in %d row(s); lifted for this step", int(dead.sum()))
        out = torch.where(dead[:, None], logits, out)
    return out
