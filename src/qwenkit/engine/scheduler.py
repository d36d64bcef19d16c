"""Continuous batching: which sequences run in the next step, and how many tokens each.

One step mixes decodes (one token per running stream) with prefill chunks of new or resumed
prompts, under a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Decodes are scheduled before prefill chunks, so running streams never stall behind a long prompt.

Priorities follow vLLM: a *lower* `priority` value is served first. Within a class, earlier
arrivals go first. When blocks run out, the lowest-priority, latest-arrived running sequence is
preempted by recompute: its blocks are freed, its tokens (prompt + generated so far) are kept, and
it re-enters the waiting queue to be prefilled again (prefix caching usually revives most of it).
A waiting sequence of strictly higher priority may preempt lower-priority running ones.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        release_window: int | None = None,
        num_sink_tokens: int = 0,
    ) -> None:
        """`release_window`: when every layer attends to at most this many keys (the current one
        included) plus `num_sink_tokens` initial tokens, blocks wholly outside are released."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                f"({max_num_seqs}) so that every running sequence can decode in one step"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.release_window = release_window
        self.num_sink_blocks = -(-num_sink_tokens // block_manager.block_size)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # sorted by Sequence.sort_key
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (`stop` / `length` / `abort`) and return its blocks, from any queue."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.add(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
        logger.debug("preempted %r (recompute)", seq)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        planned: dict[Sequence, int] = {}
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        def unplan(victim: Sequence) -> None:
            nonlocal budget
            budget += planned.pop(victim, 0)
            self._preempt(victim, out)

        # 1. Running sequences: decodes first, then prefill chunks, each in priority order.
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate(seq, n):
                # A prefill chunk shrinks to what fits before anyone is preempted.
                room = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size
                fit = room - seq.num_cached_tokens
                if fit >= 1:
                    n = min(n, fit)
                    continue
                victim = self.running[-1]
                unplan(victim)
                if victim is seq:
                    break
            else:
                planned[seq] = n
                budget -= n

        # 2. Waiting sequences, in priority order, while budget, sequence cap and blocks allow.
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                if not self._lower_priority_running(seq):
                    break
                unplan(self.running[-1])
                continue
            if not seq.block_table:
                bm.match_prefix(seq)
                self._release_out_of_window(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.allocate(seq, n):
                fit = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_cached_tokens
                if not self.running and fit >= 1:
                    n = fit  # alone in the engine: take a smaller chunk rather than stall
                    ok = bm.allocate(seq, n)
                    assert ok
                else:
                    self._return_blocks(seq)
                    if not self._lower_priority_running(seq):
                        break
                    unplan(self.running[-1])
                    continue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            planned[seq] = n
            budget -= n

        # Decodes first in the batch (the model runner groups query lengths).
        for seq, n in sorted(planned.items(), key=lambda item: item[1] > 1):
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
        return out

    def _return_blocks(self, seq: Sequence) -> None:
        """A waiting sequence that could not be admitted gives back its prefix-cache hits."""
        self.block_manager.free(seq)
        seq.num_cached_tokens = 0
        seq.block_hashes.clear()
        seq.num_released_blocks = 0

    def _release_out_of_window(self, seq: Sequence) -> None:
        if self.release_window is not None:
            first_visible = seq.num_cached_tokens - self.release_window + 1
            self.block_manager.release_out_of_window(seq, first_visible, self.num_sink_blocks)

    def _lower_priority_running(self, seq: Sequence) -> bool:
        return bool(self.running) and self.running[-1].priority > seq.priority

    # ------------------------------------------------------------------ after the forward
    def advance(self, out: SchedulerOutput) -> None:
        """Account for the KV the last step wrote; cache full blocks; release slid-out blocks."""
        bm = self.block_manager
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_cached_tokens += n
            bm.cache_full_blocks(seq)
            self._release_out_of_window(seq)
