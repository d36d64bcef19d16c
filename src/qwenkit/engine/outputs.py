"""What the engine returns, under vLLM's names (`RequestOutput`, `CompletionOutput`, `Logprob`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every update carries everything generated so far
    DELTA = 1  # every update carries only what is new since the last one
    FINAL_ONLY = 2  # one update, when the request finishes


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when the token is outside the top-k asked for
    decoded_token: str | None = None


def logprob_entry(
    token: int,
    logprob: float,
    top_ids: list[int] | None,
    top_logprobs: list[float] | None,
    decode: Callable[[int], str | None],
) -> dict[int, Logprob]:
    """One position's log-probs: the chosen token first (rank None unless it is among the
    top-k), then the top-k alternatives by rank."""
    entry: dict[int, Logprob] = {}
    for rank, (tid, tlp) in enumerate(zip(top_ids or (), top_logprobs or ()), start=1):
        entry[tid] = Logprob(tlp, rank, decode(tid))
    if token not in entry:
        entry = {token: Logprob(logprob, None, decode(token)), **entry}
    return entry


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served by the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    priority: int = 0
    # Raw log-probs of the prompt tokens given their prefix (the first is None), when
    # SamplingParams.prompt_logprobs is set; a DELTA stream carries them once.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def usage(self) -> Usage:
        """Token counts so far (for a DELTA update: the completion tokens of this update)."""
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=sum(len(o.token_ids) for o in self.outputs),
            cached_tokens=self.num_cached_tokens,
        )
