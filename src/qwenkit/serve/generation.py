"""One HTTP generation request as engine work: sampling parameters, the engine sub-requests,
and `GenerationRun`, which merges their DELTA outputs into one stream of per-choice deltas.

A run owns an admission slot and its engine requests. It ends in exactly one of three ways:
every sub-request finished; the client disconnected; the request timed out. `close()` (always
called, idempotent) aborts whatever is still running, so the KV blocks go back to the pool,
releases the slot and records the metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import anyio
from starlette.requests import Request

from qwenkit.engine.outputs import Logprob, RequestOutput
from qwenkit.sampling_params import LOGIT_BIAS_LIMIT, SamplingParams, StructuredOutputsParams
from qwenkit.serve.engine_client import EngineClient
from qwenkit.serve.errors import OpenAIError, bad_request
from qwenkit.serve.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from qwenkit.serve.state import ServerState

logger = logging.getLogger(__name__)

_DISCONNECTED = object()
_TIMED_OUT = object()
_SUB_DONE = object()
_SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "max_tokens", "logprobs",
    "logit_bias", "allowed_token_ids", "bad_words",
}  # fmt: skip


class ClientDisconnected(Exception):
    pass


def request_priority(req: SamplingFields, raw: Request) -> int:
    """Body `priority` wins over the `X-Priority` header; lower values are served first."""
    if req.priority is not None:
        return req.priority
    header = raw.headers.get("x-priority")
    if header is None:
        return 0
    try:
        value = int(header)
    except ValueError:
        raise bad_request(f"X-Priority header must be an integer, got {header!r}", param="X-Priority") from None
    if not -(2**31) <= value < 2**31:
        raise bad_request("X-Priority header is out of range", param="X-Priority")
    return value


def parse_logit_bias(raw: Mapping[str, Any] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as strings -> a bias in [-100, 100]; 400s name the key."""
    if raw is None:
        return None
    out: dict[int, float] = {}
    for full_key, value in raw.items():
        key = full_key if len(full_key) <= 40 else full_key[:40] + "..."  # as shown in errors
        try:
            token = int(full_key)
        except ValueError:
            token = -1
        if token < 0:
            raise bad_request(f"logit_bias key {key!r} is not a token id (a non-negative integer)", param="logit_bias")
        if token >= vocab_size:
            raise bad_request(f"logit_bias key {key!r} is outside the vocabulary [0, {vocab_size})", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"logit_bias[{key!r}] must be a number, got {str(value)[:40]!r}", param="logit_bias")
        if not abs(value) <= LOGIT_BIAS_LIMIT:  # also NaN (json accepts it); ints of any size
            raise bad_request(f"logit_bias[{key!r}] is {str(value)[:40]}; it must be in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def build_sampling_params(
    req: SamplingFields,
    defaults: Mapping[str, Any],
    *,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """Request fields over the model's generation defaults (vLLM's precedence)."""
    bad = next((t for t in req.allowed_token_ids or () if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"allowed_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})",
                          param="allowed_token_ids")  # fmt: skip
    gen = dict(defaults)
    overrides = {
        "n": req.n,
        "temperature": req.temperature,
        # OpenAI allows top_p = 0 (keep the top token); the sampler always keeps the first one.
        "top_p": None if req.top_p is None else max(req.top_p, 1e-9),
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "stop": req.stop_list,
        "stop_token_ids": req.stop_token_ids or [],
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "logit_bias": parse_logit_bias(req.logit_bias, vocab_size),
        "allowed_token_ids": req.allowed_token_ids,
        "bad_words": req.bad_words,
        "structured_outputs": structured_outputs,
    }
    try:
        return SamplingParams.from_generation_config(gen, **overrides)
    except ValueError as e:  # SamplingParams names the field first: "min_tokens must be ..."
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), param=name if name in _SAMPLING_FIELDS else None) from None


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str) -> int:
    if prompt_len >= max_model_len:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} tokens (at least one must be left to generate)",
            param=prompt_param, code="context_length_exceeded",
        )  # fmt: skip
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} to generate)",
            param="max_tokens", code="context_length_exceeded",
        )  # fmt: skip
    return requested


@dataclass
class SubRequest:
    """One engine request: `params.n` choices numbered from `first_choice`."""

    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    first_choice: int
    multi_modal_data: Mapping[str, Any] | None = None  # vLLM's: {"image": [PIL images]}


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class GenerationRun:
    state: ServerState
    engine: EngineClient
    subs: list[SubRequest]
    priority: int = 0
    raw_request: Request | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)
    # Prompt log-probs per prompt index, once the engine reported them (echo with logprobs).
    prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = field(default_factory=dict)
    # Prompt lengths as the engine counts them (image placeholders expanded), per prompt index.
    engine_prompt_lens: dict[int, int] = field(default_factory=dict)
    outcome: str | None = None  # "finished" | "client_disconnect" | "timeout" | "error"
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _timer: asyncio.TimerHandle | None = None
    _closed: bool = False

    @property
    def prompt_tokens(self) -> int:
        seen: dict[int, int] = {}
        for sub in self.subs:
            seen[sub.prompt_index] = self.engine_prompt_lens.get(sub.prompt_index, len(sub.prompt_token_ids))
        return sum(seen.values())

    @property
    def num_choices(self) -> int:
        return sum(s.params.n for s in self.subs)

    def usage(self) -> UsageInfo:
        p, c = self.prompt_tokens, self.completion_tokens
        return UsageInfo(
            prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )  # fmt: skip

    # ------------------------------------------------------------------ the stream
    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Per-choice deltas, interleaved across choices; raises ClientDisconnected or a 504."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, sub in enumerate(self.subs):
            self._tasks.append(asyncio.create_task(self._pump(i, sub, queue)))
        if self.raw_request is not None:
            self._tasks.append(asyncio.create_task(self._watch_disconnect(self.raw_request, queue)))
        timeout = self.state.settings.request_timeout
        if timeout is not None:
            self._timer = loop.call_later(max(0.0, self.arrival + timeout - time.monotonic()), queue.put_nowait, _TIMED_OUT)
        remaining = len(self.subs)
        try:
            while remaining:
                item = await queue.get()
                if item is _SUB_DONE:
                    remaining -= 1
                elif item is _DISCONNECTED:
                    self.outcome = "client_disconnect"
                    raise ClientDisconnected()
                elif item is _TIMED_OUT:
                    self.outcome = "timeout"
                    raise OpenAIError(
                        f"generation did not finish within the request timeout ({timeout:g} s)",
                        status_code=504, type="timeout_error", code="request_timeout",
                    )  # fmt: skip
                elif isinstance(item, BaseException):
                    self.outcome = "error"
                    raise item
                else:
                    sub, out = item
                    for delta in self._choice_deltas(sub, out):
                        yield delta
            self.outcome = "finished"
        finally:
            await self.close()

    def _choice_deltas(self, sub: SubRequest, out: RequestOutput) -> list[ChoiceDelta]:
        now = time.monotonic()
        if sub is self.subs[0]:
            self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[sub.prompt_index] = out.prompt_logprobs
        if out.prompt_token_ids:
            self.engine_prompt_lens[sub.prompt_index] = len(out.prompt_token_ids)
        deltas = []
        for o in out.outputs:
            if o.token_ids and self.first_token_time is None:
                self.first_token_time = now
            self.completion_tokens += len(o.token_ids)
            index = sub.first_choice + o.index
            if o.finish_reason is not None:
                self.finish_reasons[index] = o.finish_reason
            deltas.append(ChoiceDelta(index, o.text, list(o.token_ids), o.logprobs, o.finish_reason, o.stop_reason))
        return deltas

    async def _pump(self, i: int, sub: SubRequest, queue: asyncio.Queue[Any]) -> None:
        rid = f"{self.request_id}-{i}"
        try:
            mm = {"multi_modal_data": sub.multi_modal_data} if sub.multi_modal_data else {}
            async for out in self.engine.generate(sub.prompt_token_ids, sub.params, rid, self.priority, **mm):
                queue.put_nowait((sub, out))
        except asyncio.CancelledError:
            raise
        except ValueError as e:  # the engine refused the request (bad ids, too long, ...)
            queue.put_nowait(bad_request(str(e)))
            return
        except Exception as e:
            logger.exception("engine failure on request %s", rid)
            queue.put_nowait(OpenAIError(f"engine error: {e}", status_code=500, type="internal_error"))
            return
        queue.put_nowait(_SUB_DONE)

    @staticmethod
    async def _watch_disconnect(request: Request, queue: asyncio.Queue[Any]) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                queue.put_nowait(_DISCONNECTED)
                return

    def abandon(self) -> None:
        """Synchronous part of `close()`: cancel the engine work (each cancelled pump closes its
        engine stream, which aborts the engine request), release the admission slot, record
        the metrics. Safe inside a cancelled scope, where every await would raise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.state.release()
        m = self.state.metrics
        if self.outcome == "finished":
            m.observe_finished(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                finish_reasons=list(self.finish_reasons.values()),
                ttft=None if self.first_token_time is None else self.first_token_time - self.arrival,
                e2e=time.monotonic() - self.arrival,
            )
        else:
            m.request_aborted.labels(m.model_name, self.outcome or "client_disconnect").inc()

    async def close(self) -> None:
        """`abandon()`, then wait (shielded from cancellation) for the pumps to wind down."""
        self.abandon()
        if self._tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*self._tasks, return_exceptions=True)


async def collect(run: GenerationRun) -> dict[int, list[ChoiceDelta]]:
    """Run to the end (non-streaming): every choice's deltas, in order."""
    per_choice: dict[int, list[ChoiceDelta]] = {}
    async for d in run.deltas():
        per_choice.setdefault(d.index, []).append(d)
    return per_choice
