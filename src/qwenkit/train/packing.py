"""Arrange documents into rows: best-fit-decreasing packing, length bucketing, and :func:`collate`.

* :func:`best_fit_decreasing` packs documents of known lengths into rows of ``capacity`` tokens
  (SFT and pretraining with packing): longest first, each into the fullest row it still fits.
* :func:`bucket_lengths` / :func:`assign_buckets` group documents by length for unpacked
  pretraining: a document goes to the smallest bucket length ``L >= len(doc)``, one per row, and
  each step holds ``token_budget // L`` rows of one bucket.
* :func:`collate` turns rows of :class:`~qwenkit.train.sft_data.Example` into the trainer's
  :class:`~qwenkit.train.batch.Batch`.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np
import torch

from .batch import IGNORE_INDEX, Batch
from .sft_data import Example

__all__ = ["assign_buckets", "best_fit_decreasing", "bucket_lengths", "collate"]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (by index) into rows of ``capacity``; returns the rows as lists of indices.

    Items are placed longest first (ties: lower index first), each into the row with the least
    room left that still fits it (ties: the oldest row), else into a new row. Deterministic: the
    result depends only on ``lengths`` and ``capacity``. Raises ``ValueError`` for an item longer
    than ``capacity`` or of length < 1.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Rows with room left, grouped by how much room: the sorted distinct amounts (at most
    # `capacity` of them) and, per amount, a min-heap of row numbers.
    room_values: list[int] = []
    rows_by_room: dict[int, list[int]] = {}

    def add(room: int, row: int) -> None:
        if room == 0:
            return
        heap = rows_by_room.get(room)
        if heap is None:
            rows_by_room[room] = [row]
            bisect.insort(room_values, room)
        else:
            heapq.heappush(heap, row)

    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room_values, n)
        if k == len(room_values):
            rows.append([i])
            add(capacity - n, len(rows) - 1)
            continue
        room = room_values[k]
        heap = rows_by_room[room]
        row = heapq.heappop(heap)
        if not heap:
            del rows_by_room[room]
            room_values.pop(k)
        rows[row].append(i)
        add(room - n, row)
    return rows


def bucket_lengths(max_length: int, min_length: int = 512) -> list[int]:
    """Powers of two from ``min_length`` up to ``max_length`` (``max_length`` itself last if it is
    not a power of two): the default buckets are 512, 1024, ..., 8192 for ``max_length=8192``."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    out: list[int] = []
    L = 1
    while L < min_length:
        L *= 2
    while L < max_length:
        out.append(L)
        L *= 2
    out.append(max_length)
    return out


def assign_buckets(lengths: Sequence[int] | np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index into ``buckets`` (sorted ascending) of the smallest bucket that holds each length."""
    b = np.asarray(sorted(buckets), dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)
    idx = np.searchsorted(b, lens, side="left")
    if lens.size and idx.max() >= len(b):
        i = int(np.argmax(idx >= len(b)))
        raise ValueError(f"item {i} has length {int(lens[i])}, longer than the largest bucket {int(b[-1])}")
    return idx


def collate(rows: Sequence[Sequence[Example]], row_length: int | None = None, *,
            pad_to_multiple_of: int = 8) -> Batch:  # fmt: skip
    """Rows of documents -> :class:`Batch` of shape ``(len(rows), row_length)``.

    Each row's documents are concatenated. Within a document ``targets[t] = labels[t + 1]``; a
    document's last token and padding get IGNORE_INDEX. ``position_ids`` restart at 0 per
    document, ``document_ids`` count 0, 1, ... per row and are -1 on padding, padded
    ``input_ids`` are 0. ``row_length=None`` pads to the longest row rounded up to a multiple of
    ``pad_to_multiple_of`` (at least one multiple, so an all-empty batch keeps a shape).
    Raises ``ValueError`` when a row does not fit ``row_length``.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    used = [sum(len(d) for d in row) for row in rows]
    if row_length is None:
        m = max(1, pad_to_multiple_of)
        row_length = max(m, -(-max(used) // m) * m)
    for r, n in enumerate(used):
        if n > row_length:
            raise ValueError(f"row {r} holds {n} tokens, more than row_length {row_length}")
    shape = (len(rows), row_length)
    input_ids = np.zeros(shape, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    document_ids = np.full(shape, -1, dtype=np.int64)
    for r, row in enumerate(rows):
        t = 0
        for d, doc in enumerate(row):
            n = len(doc)
            if n == 0:
                continue
            input_ids[r, t : t + n] = np.asarray(doc.input_ids, dtype=np.int64)
            targets[r, t : t + n - 1] = np.asarray(doc.labels[1:], dtype=np.int64)
            position_ids[r, t : t + n] = np.arange(n)
            document_ids[r, t : t + n] = d
            t += n
    return Batch(*(torch.from_numpy(a) for a in (input_ids, targets, position_ids, document_ids)))
