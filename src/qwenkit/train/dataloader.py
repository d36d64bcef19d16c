"""`StepLoader`: deterministic, resumable, rank-sharded batches for the trainer loop.

Each epoch is planned from the document lengths alone: the documents are shuffled with
``(seed, epoch)``, documents longer than ``max_length`` are split into overlapping pieces, and
the pieces are either packed into rows of ``max_length`` (:func:`best_fit_decreasing`, rows then
shuffled and cut into steps of ``batch_size`` rows) or bucketed by length (one document per row,
each step ``token_budget // L`` rows of one bucket ``L``, steps shuffled).

A global step is a fixed list of rows that depends only on the data, ``seed``, ``epoch`` and the
packing settings, never on ``world_size`` or ``micro_batch_size``: rank ``r`` takes rows
``r::world_size`` and cuts them into micro-batches. A step whose rows do not divide evenly is
padded with empty rows (all padding, no targets), so every rank runs the same number of
micro-batches and the summed update is the same for any layout.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from .batch import IGNORE_INDEX, Batch
from .packing import assign_buckets, best_fit_decreasing, bucket_lengths, collate
from .sft_data import Example

__all__ = ["IndexRange", "PlannedStep", "StepLoader", "split_held_out"]

logger = logging.getLogger(__name__)

#: (document index, start, stop): a document or a piece of one.
Segment = tuple[int, int, int]


class DocumentSource(Protocol):
    """What StepLoader reads: ``len``, ``source[i]`` -> an :class:`Example`, or token ids (a list /
    numpy array, trained on every token, e.g. :class:`qwenkit.data.shards.TokenShards`).
    An optional ``lengths`` attribute avoids reading every document to plan."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


@dataclass(frozen=True)
class PlannedStep:
    """One global optimizer step: rows of segments, padded to ``row_length`` tokens."""

    row_length: int
    rows: tuple[tuple[Segment, ...], ...]


class IndexRange:
    """A contiguous view ``source[start:stop]`` that keeps ``lengths`` (for :func:`split_held_out`)."""

    def __init__(self, source: DocumentSource, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"range [{start}, {stop}) is outside [0, {len(source)}]")
        self.source, self.start, self.stop = source, start, stop
        lengths = getattr(source, "lengths", None)
        if lengths is not None:
            self.lengths = np.asarray(lengths)[start:stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range ({len(self)} items)")
        return self.source[self.start + i]


def split_held_out(source: DocumentSource, *, n: int | None = None,
                   fraction: float | None = None) -> tuple[IndexRange, IndexRange]:  # fmt: skip
    """(train, held_out): the last ``n`` documents, or the last ``fraction`` of them (at least one),
    are held out for eval loss. Raises ``ValueError`` when nothing would be left to train on."""
    total = len(source)
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n and fraction")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        n = max(1, int(round(total * fraction)))
    assert n is not None
    if not 0 < n < total:
        raise ValueError(f"cannot hold out {n} of {total} documents")
    return IndexRange(source, 0, total - n), IndexRange(source, total - n, total)


def _as_example(item: Any) -> Example:
    if isinstance(item, Example):
        return item
    ids = np.asarray(item)
    if ids.ndim != 1:
        raise ValueError(f"a document must be an Example or a 1-D sequence of token ids, got shape {ids.shape}")
    return Example(ids, ids)


class StepLoader:
    """Yields, per optimizer step, this rank's micro-batches (``list[Batch]``).

    Args:
        source: a sequence of :class:`Example` or of token-id arrays (e.g. ``TokenShards``).
        max_length: row length when packing; the largest bucket otherwise. Longer documents are
            split into pieces overlapping by one token (every next-token target kept once), or
            rejected with ``overflow="error"``.
        packing: pack documents into rows (True) or bucket them by length (False).
        batch_size: global rows per step when packing.
        token_budget: tokens per step when bucketing: ``token_budget // L`` rows of bucket ``L``.
        buckets: bucket lengths (default :func:`bucket_lengths` ``(max_length)``: 512 ... max_length).
        micro_batch_size: rows per micro-batch on each rank.
        rank, world_size: this process's place in data parallelism.
        seed: shuffling seed (with the epoch).
        shuffle: shuffle documents and steps each epoch (False: data order, e.g. for eval).
        max_steps: stop after this many steps in all (None: endless, epoch after epoch).
        pad_to_longest: pad each micro-batch to its longest row rounded up to 8 instead of the full
            row length (less compute; shapes then vary).
    """

    def __init__(
        self,
        source: DocumentSource,
        *,
        max_length: int,
        packing: bool = True,
        batch_size: int | None = None,
        token_budget: int = 8192,
        buckets: Sequence[int] | None = None,
        micro_batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_steps: int | None = None,
        pad_to_longest: bool = False,
        overflow: Literal["split", "error"] = "split",
    ) -> None:
        if len(source) == 0:
            raise ValueError("the training data has no documents")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if packing and (batch_size is None or batch_size < 1):
            raise ValueError("packing needs batch_size (global rows per step) >= 1")
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad layout: micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}")
        if overflow not in ("split", "error"):
            raise ValueError(f"overflow must be 'split' or 'error', got {overflow!r}")
        self.source = source
        self.max_length = int(max_length)
        self.packing = packing
        self.batch_size = batch_size
        self.token_budget = int(token_budget)
        self.buckets = sorted(int(b) for b in (buckets or bucket_lengths(self.max_length, min(512, self.max_length))))
        if self.buckets[-1] > self.max_length:
            raise ValueError(f"bucket {self.buckets[-1]} is longer than max_length {self.max_length}")
        if not packing and self.token_budget < self.buckets[0]:
            raise ValueError(f"token_budget {self.token_budget} is smaller than the smallest bucket {self.buckets[0]}")
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.max_steps = seed, shuffle, max_steps
        self.pad_to_longest = pad_to_longest

        lengths = getattr(source, "lengths", None)
        if lengths is None:
            lengths = [len(_as_example(source[i])) for i in range(len(source))]
        self._segments = self._segment(np.asarray(lengths, dtype=np.int64), overflow)
        self._seg_lengths = np.array([b - a for _, a, b in self._segments], dtype=np.int64)
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_done = 0
        self._plan_cache: tuple[int, list[PlannedStep]] | None = None

    def _segment(self, lengths: np.ndarray, overflow: str) -> list[Segment]:
        limit = self.max_length if self.packing else self.buckets[-1]
        segments: list[Segment] = []
        split = 0
        for i, n in enumerate(lengths.tolist()):
            if n < 2:  # no next-token target in a 0/1-token document
                continue
            if n <= limit:
                segments.append((i, 0, n))
                continue
            if overflow == "error":
                raise ValueError(f"document {i} has {n} tokens, more than {limit}")
            split += 1
            for start in range(0, n - 1, limit - 1):
                segments.append((i, start, min(start + limit, n)))
        if split:
            logger.info("split %d documents longer than %d tokens into overlapping pieces", split, limit)
        if not segments:
            raise ValueError("no document has at least 2 tokens")
        return segments

    # ------------------------------------------------------------------ planning
    def plan(self, epoch: int) -> list[PlannedStep]:
        """The global steps of ``epoch`` (cached for the current epoch)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self._segments)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        steps: list[PlannedStep] = []
        if self.packing:
            assert self.batch_size is not None
            packed = best_fit_decreasing(self._seg_lengths[order], self.max_length)
            rows = [tuple(self._segments[int(order[j])] for j in row) for row in packed]
            if self.shuffle:
                rows = [rows[int(k)] for k in rng.permutation(len(rows))]
            for s in range(0, len(rows), self.batch_size):
                steps.append(PlannedStep(self.max_length, tuple(rows[s : s + self.batch_size])))
        else:
            bucket_of = assign_buckets(self._seg_lengths[order], self.buckets)
            for b, L in enumerate(self.buckets):
                members = [self._segments[int(j)] for j in order[bucket_of == b]]
                per_step = max(1, self.token_budget // L)
                for s in range(0, len(members), per_step):
                    steps.append(PlannedStep(L, tuple((seg,) for seg in members[s : s + per_step])))
            if self.shuffle:
                steps = [steps[int(k)] for k in rng.permutation(len(steps))]
        self._plan_cache = (epoch, steps)
        return steps

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch (the same every epoch)."""
        return len(self.plan(self.epoch))

    # ------------------------------------------------------------------ batches
    def _example(self, seg: Segment) -> Example:
        i, start, stop = seg
        ex = _as_example(self.source[i])
        if start == 0 and stop == len(ex):
            return ex
        labels = ex.labels[start:stop]
        if start:  # a later piece's first token is context only (trained in the previous piece)
            labels = np.array(labels, dtype=np.int64)
            labels[0] = IGNORE_INDEX
        return Example(ex.input_ids[start:stop], labels)

    def rank_micro_batches(self, step: PlannedStep) -> list[Batch]:
        """This rank's micro-batches of one global step."""
        rows: list[tuple[Segment, ...]] = list(step.rows)
        unit = self.world_size * self.micro_batch_size
        rows += [()] * (-len(rows) % unit)  # empty rows: every rank runs the same micro-batches
        mine = rows[self.rank :: self.world_size]
        row_length = None if self.pad_to_longest else step.row_length
        out = []
        for s in range(0, len(mine), self.micro_batch_size):
            docs = [[self._example(seg) for seg in row] for row in mine[s : s + self.micro_batch_size]]
            out.append(collate(docs, row_length))
        return out

    def __iter__(self) -> Iterator[list[Batch]]:
        while self.max_steps is None or self.steps_done < self.max_steps:
            steps = self.plan(self.epoch)
            if self.step_in_epoch >= len(steps):
                self.epoch += 1
                self.step_in_epoch = 0
                continue
            step = steps[self.step_in_epoch]
            # advance first, so state_dict() taken after this step resumes at the next one
            self.step_in_epoch += 1
            self.steps_done += 1
            yield self.rank_micro_batches(step)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the next step comes from; ``world_size`` / ``micro_batch_size`` may change on resume."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "steps_done": self.steps_done,
                "seed": self.seed, "steps_per_epoch": self.steps_per_epoch,
                "num_documents": len(self.source)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next steps are exactly those a straight run would yield from this point.

        Raises ``ValueError`` when the seed or the data (document count, steps per epoch) differ.
        """
        if state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state.get('seed')}, this loader's is {self.seed}")
        if state.get("num_documents", len(self.source)) != len(self.source):
            raise ValueError(f"the checkpoint was taken on {state['num_documents']} documents, "
                             f"this data has {len(self.source)}")  # fmt: skip
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.steps_done = int(state.get("steps_done", 0))
        if state.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise ValueError(f"the checkpoint's epochs have {state['steps_per_epoch']} steps, this loader's "
                             f"{self.steps_per_epoch}: the data or the packing settings changed")  # fmt: skip
