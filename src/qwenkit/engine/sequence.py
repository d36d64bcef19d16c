"""One generation stream: its tokens, where its KV lives, and how far it has been computed."""
from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING, Any

import torch

from qwenkit.engine.outputs import Logprob
from qwenkit.sampling_params import SamplingParams

if TYPE_CHECKING:
    from qwenkit.engine.logits_processors import SequenceLogitsState


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """A prompt plus the tokens generated for it.

    Invariants:
    - `token_ids` = prompt tokens + output tokens; `num_prompt_tokens` never changes.
    - `num_cached_tokens` tokens (a prefix of `token_ids`) have their KV written in the blocks of
      `block_table`; the rest still have to go through the model. Prefix-cache hits count here.
    - `block_table[i]` holds positions [i * block_size, (i + 1) * block_size); an entry of -1 is
      a block released because it slid out of every layer's attention window.
    - Preemption (recompute) resets `num_cached_tokens` and `block_table` but keeps `token_ids`,
      so the sequence resumes where it was.
    """

    _counter = itertools.count()

    def __init__(
        self,
        token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        request_id: str = "",
        index: int = 0,
        priority: int = 0,
        arrival_time: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is required")
        self.seq_id = next(Sequence._counter)
        self.request_id = request_id
        self.index = index  # position among the request's `n` samples
        self.priority = priority
        self.arrival_time = arrival_time
        self.sampling_params = sampling_params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_cached_tokens = 0
        self.num_prefix_cached_tokens = 0  # prompt tokens served by the prefix cache (first run)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full, computed blocks
        self.num_released_blocks = 0  # leading non-sink blocks released (sliding window)
        self.rope_factor_index = 0  # per-request YaRN: the rotary table chosen at admission
        self.mm: Any = None  # the request's images (engine.multimodal.MultiModalState), shared by its seqs
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Per-output-token log-probabilities (filled only when sampling_params.logprobs is set).
        self.output_logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        # Per-prompt-token log-probabilities (the first is None), filled as the prompt is
        # computed; None when this sequence does not compute them.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.logits_state: SequenceLogitsState | None = None  # logits processors, set by the engine
        self.num_preemptions = 0
        self.detokenizer: Any = None  # owned by the engine
        self.output_text = ""  # detokenized output, stop string already cut

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.name}, "
            f"len={len(self)}, cached={self.num_cached_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Forget every cached token (the blocks were already returned by the block manager)."""
        assert not self.block_table
        self.num_cached_tokens = 0
        self.block_hashes.clear()
        self.num_released_blocks = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower `priority` value first (vLLM), then earlier arrival."""
        return (self.priority, self.arrival_time, self.seq_id)
