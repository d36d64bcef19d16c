"""Preference pairs for DPO: records -> tokenized pairs -> `PreferenceBatch` micro-batches.

Record formats are TRL's (``{"prompt", "chosen", "rejected"}``):

* standard: three strings; like TRL the tokenizer's EOS (``<|im_end|>`` for Qwen2.5-Instruct) is
  appended to ``chosen`` and ``rejected`` unless already there;
* conversational: ``prompt`` (or ``messages``) a list of messages, ``chosen`` / ``rejected`` lists
  holding the assistant message; rendered with the model's chat template (so each completion
  ends with ``<|im_end|>\\n``);
* implicit prompt: no ``prompt`` / ``messages``: the longest common prefix of ``chosen`` and
  ``rejected`` is the prompt (TRL's ``extract_prompt``).

Tokenization is TRL 1.16's ``DPOTrainer``'s: the prompt alone (with the generation prompt) and
prompt + each completion are tokenized; the completion starts where the prompt and *both* full
sequences stop agreeing. Each row (prompt + chosen, prompt + rejected) is cut to ``max_length``
(``truncation_mode`` keep_start / keep_end, like TRL's collator) and pairs whose prompt alone
fills ``max_length`` are dropped (keep_start); both are counted and logged.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwenkit.data.readers import Record
from qwenkit.errors import DataError
from qwenkit.tokenizer import Tokenizer

from .batch import IGNORE_INDEX
from .dataloader import PlannedStep, StepLoader
from .sft_data import _common_prefix, _tools

__all__ = ["PairLoader", "PreferenceBatch", "PreferenceExample", "PreferenceStats", "collate_pairs",
           "extract_prompt", "tokenize_preference", "tokenize_preferences"]

logger = logging.getLogger(__name__)


@dataclass
class PreferenceExample:
    """One pair after truncation: each row is prompt + completion token ids; the completion
    starts at ``*_prompt_len`` (the prompt tokens kept in that row). Reference log-probs are
    filled in when precomputed."""

    chosen_ids: list[int]
    chosen_prompt_len: int
    rejected_ids: list[int]
    rejected_prompt_len: int
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None

    def __len__(self) -> int:  # the longer row: what the pair costs in a batch
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PreferenceStats:
    records: int = 0
    pairs: int = 0
    tokens: int = 0
    truncated: int = 0  # pairs with a row cut to max_length
    prompt_truncated: int = 0  # prompts cut to max_prompt_length
    dropped_prompt_too_long: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def log(self) -> None:
        logger.info("preference data: %d records -> %d pairs (%d tokens); formats %s; %d truncated to max_length, "
                    "%d prompts cut to max_prompt_length, %d dropped (prompt fills max_length)", self.records,
                    self.pairs, self.tokens, self.formats, self.truncated, self.prompt_truncated,
                    self.dropped_prompt_too_long)  # fmt: skip


# ---------------------------------------------------------------------------- tokenization
def extract_prompt(chosen: Sequence[Any], rejected: Sequence[Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full sequences (message lists or strings) sharing a
    prefix, as TRL's ``extract_prompt`` splits them (a string prompt keeps no trailing space)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, Mapping) and "role" in m for m in x)


def _fields(rec: Record) -> tuple[str, Any, Any, Any]:
    d = rec.data
    if "chosen" not in d or "rejected" not in d:
        raise rec.error(f"a preference record needs 'chosen' and 'rejected' (and 'prompt' or 'messages'); "
                        f"it has {sorted(d)}")  # fmt: skip
    chosen, rejected = d["chosen"], d["rejected"]
    prompt = d.get("prompt", d.get("messages"))
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    kinds = {isinstance(x, str) for x in (prompt, chosen, rejected)}
    if kinds == {True}:
        return "standard", prompt, chosen, rejected
    if kinds == {False} and all(_is_messages(x) for x in (prompt, chosen, rejected)):
        if not chosen or not rejected:
            raise rec.error("'chosen' and 'rejected' must each hold the assistant message")
        return "conversational", prompt, chosen, rejected
    raise rec.error("'prompt', 'chosen' and 'rejected' must all be strings, or all be lists of "
                    "{'role', 'content'} messages")  # fmt: skip


def tokenize_preference(record: Record | Mapping[str, Any], tokenizer: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) as TRL's DPOTrainer tokenizes a record; errors name
    the record's file and line."""
    rec = record if isinstance(record, Record) else Record(dict(record), "<memory>", 0, "record")
    fmt, prompt, chosen, rejected = _fields(rec)
    d = rec.data
    try:
        if fmt == "standard":
            eos = tokenizer.eos_token or ""
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
            p = tokenizer.encode(prompt)
            pc, pr = tokenizer.encode(prompt + chosen), tokenizer.encode(prompt + rejected)
        else:
            kw = dict(d.get("chat_template_kwargs") or {})
            tools = _tools(d.get("tools"))
            p = tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True, **kw)
            pc = tokenizer.apply_chat_template(prompt + chosen, tools=tools, add_generation_prompt=False,
                                               tokenize=True, **kw)  # fmt: skip
            pr = tokenizer.apply_chat_template(prompt + rejected, tools=tools, add_generation_prompt=False,
                                               tokenize=True, **kw)  # fmt: skip
    except DataError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise rec.error(f"cannot tokenize the preference record: {e}") from e
    except Exception as e:  # jinja2 errors from the chat template
        if type(e).__module__.startswith("jinja2"):
            raise rec.error(f"the chat template failed on this record: {e}") from e
        raise
    assert isinstance(p, list) and isinstance(pc, list) and isinstance(pr, list)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    if n < len(p):
        logger.warning("%s: the tokenized prompt is not a prefix of prompt + completion; the completion starts "
                       "where they diverge (%d of %d prompt tokens)", rec.where, n, len(p))  # fmt: skip
    return p[:n], pc[n:], pr[n:]


def _fit(prompt: list[int], completion: list[int], max_length: int, mode: str) -> tuple[list[int], int]:
    ids = prompt + completion
    if len(ids) <= max_length:
        return ids, len(prompt)
    if mode == "keep_start":
        return ids[:max_length], min(len(prompt), max_length)
    cut = len(ids) - max_length  # keep_end: the completion's end survives
    return ids[cut:], max(0, len(prompt) - cut)


def tokenize_preferences(records: Iterable[Record | Mapping[str, Any]], tokenizer: Tokenizer, *, max_length: int,
                         truncation_mode: str = "keep_start",
                         max_prompt_length: int = 0) -> tuple[list[PreferenceExample], PreferenceStats]:  # fmt: skip
    """Tokenize and fit every record (see the module doc). ``max_prompt_length`` > 0 first keeps
    only the last that many prompt tokens (the end of the conversation). Raises DataError when
    nothing is left."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    stats = PreferenceStats()
    out: list[PreferenceExample] = []
    for rec in records:
        stats.records += 1
        r = rec if isinstance(rec, Record) else Record(dict(rec), "<memory>", stats.records, "record")
        prompt, chosen, rejected = tokenize_preference(r, tokenizer)
        fmt = "standard" if isinstance(r.data["chosen"], str) else "conversational"
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        if max_prompt_length and len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.prompt_truncated += 1
        if truncation_mode == "keep_start" and len(prompt) >= max_length:
            stats.dropped_prompt_too_long += 1  # TRL drops these: no completion token would be left
            continue
        c, cp = _fit(prompt, chosen, max_length, truncation_mode)
        j, jp = _fit(prompt, rejected, max_length, truncation_mode)
        if len(c) < len(prompt) + len(chosen) or len(j) < len(prompt) + len(rejected):
            stats.truncated += 1
        out.append(PreferenceExample(c, cp, j, jp))
        stats.pairs += 1
        stats.tokens += len(c) + len(j)
    if stats.records == 0:
        raise DataError("no preference records")
    stats.log()
    if not out:
        raise DataError(f"all {stats.records} pairs were dropped: their prompts fill max_length={max_length}")
    return out, stats


# ---------------------------------------------------------------------------- batches
@dataclass
class PreferenceBatch:
    """B pairs as 2B rows, ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` (TRL's order).

    input_ids (2B, T): right-padded with 0.
    targets (2B, T): the completion token each position predicts, IGNORE_INDEX elsewhere.
    lengths (2B,): real tokens of each row. completion_lengths (2B,): completion tokens of each
        row (TRL's ``completion_mask.sum(1)``, IPO's length normalisation).
    valid (B,): False for the empty pairs that pad a step to the same micro-batches on every rank.
    ref_chosen_logps / ref_rejected_logps (B,): precomputed reference log-probs, or None.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    completion_lengths: torch.Tensor
    valid: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.valid.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.valid.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device | str) -> PreferenceBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PreferenceBatch(*(mv(getattr(self, f)) for f in (  # type: ignore[arg-type]
            "input_ids", "targets", "lengths", "completion_lengths", "valid", "ref_chosen_logps",
            "ref_rejected_logps")))  # fmt: skip


def collate_pairs(pairs: Sequence[PreferenceExample | None], pad_to_multiple_of: int = 8) -> PreferenceBatch:
    """Rows of the pairs (None: an empty pair with no targets), right-padded to the longest."""
    rows: list[tuple[list[int], int]] = []
    for pick in ("chosen", "rejected"):
        for p in pairs:
            rows.append(([], 0) if p is None else (getattr(p, f"{pick}_ids"), getattr(p, f"{pick}_prompt_len")))
    t = max([len(ids) for ids, _ in rows] + [2])
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.zeros((len(rows), t), dtype=np.int64)
    targets = np.full((len(rows), t), IGNORE_INDEX, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    comp = np.zeros(len(rows), dtype=np.int64)
    for r, (row, prompt_len) in enumerate(rows):
        n = len(row)
        ids[r, :n] = row
        lengths[r] = n
        comp[r] = n - prompt_len
        # position i predicts token i + 1 when that token is a completion token
        start = max(prompt_len, 1)
        if n > start:
            targets[r, start - 1 : n - 1] = row[start:]
    refs: list[torch.Tensor | None] = [None, None]
    real = [p for p in pairs if p is not None]
    if real and all(p.ref_chosen_logps is not None for p in real):
        refs = [torch.tensor([0.0 if p is None else getattr(p, f"ref_{k}_logps") for p in pairs], dtype=torch.float32)
                for k in ("chosen", "rejected")]  # fmt: skip
    return PreferenceBatch(torch.from_numpy(ids), torch.from_numpy(targets), torch.from_numpy(lengths),
                           torch.from_numpy(comp), torch.tensor([p is not None for p in pairs]), *refs)


class PairLoader(StepLoader):
    """StepLoader's steps over preference pairs: each epoch the pairs are shuffled with
    ``(seed, epoch)`` and cut into global steps of ``batch_size`` pairs (the last one may be
    short); rank ``r`` takes pairs ``r::world_size`` in micro-batches of ``micro_batch_size``
    pairs, padded with empty pairs so every rank runs the same micro-batches. Resume state
    (``state_dict``) is StepLoader's."""

    def __init__(self, pairs: Sequence[PreferenceExample], *, batch_size: int, micro_batch_size: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:  # fmt: skip
        longest = max(len(p) for p in pairs) if len(pairs) else 2
        super().__init__(_Lengths(pairs), max_length=max(longest, 2), packing=True, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                         shuffle=shuffle, overflow="error")  # fmt: skip

    def plan(self, epoch: int) -> list[PlannedStep]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self._segments)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        assert self.batch_size is not None
        steps = [PlannedStep(self.max_length, tuple((self._segments[int(j)],) for j in order[s : s + self.batch_size]))
                 for s in range(0, n, self.batch_size)]  # fmt: skip
        self._plan_cache = (epoch, steps)
        return steps

    def rank_micro_batches(self, step: PlannedStep) -> list[PreferenceBatch]:  # type: ignore[override]
        rows: list[tuple[Any, ...]] = list(step.rows)
        rows += [()] * (-len(rows) % (self.world_size * self.micro_batch_size))
        mine = rows[self.rank :: self.world_size]
        pairs = self.source.pairs
        return [collate_pairs([pairs[row[0][0]] if row else None for row in mine[s : s + self.micro_batch_size]])
                for s in range(0, len(mine), self.micro_batch_size)]  # fmt: skip


class _Lengths:
    """The pairs as StepLoader's document source: only their lengths are read."""

    def __init__(self, pairs: Sequence[PreferenceExample]) -> None:
        self.pairs = pairs
        self.lengths = np.array([max(len(p), 2) for p in pairs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.pairs[i]
