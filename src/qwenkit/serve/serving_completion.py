"""POST /v1/completions: raw prompts (text or token ids, one or several) on the engine.

Choice `i * n + j` is sample j of prompt i, as in OpenAI's API. `suffix` turns a text prompt
into a Qwen2.5-Coder fill-in-the-middle prompt (the text returned is the middle). `echo` with
`logprobs` returns the prompt tokens' log-probs (the first one None) before the completion's,
from the engine's `prompt_logprobs`.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwenkit.engine.outputs import Logprob
from qwenkit.serve.errors import OpenAIError, bad_request
from qwenkit.serve.generation import (
    ChoiceDelta,
    ClientDisconnected,
    GenerationRun,
    SubRequest,
    build_sampling_params,
    collect,
    request_priority,
    resolve_max_tokens,
)
from qwenkit.serve.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from qwenkit.serve.serving_chat import CLIENT_CLOSED, check_model
from qwenkit.serve.state import ServerState
from qwenkit.serve.streaming import SSE_HEADERS, RunStreamingResponse, sse, sse_events
from qwenkit.tokenizer.fim import FIM_END_TOKENS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_prompt

MAX_PROMPTS = 64


def _fim_prompts(tokenizer: Any, req: CompletionRequest) -> list[str]:
    """The prompts as fill-in-the-middle prompts around `req.suffix`."""
    assert req.suffix is not None
    p = req.prompt
    if not (isinstance(p, str) or all(isinstance(x, str) for x in p)):
        raise bad_request("suffix needs a text prompt (not token ids)", param="suffix")
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if tokenizer.token_to_id(t) is None]
    if missing:
        raise bad_request(f"suffix (fill-in-the-middle) needs the FIM tokens {missing}, which this model's tokenizer lacks",
                          param="suffix")  # fmt: skip
    try:
        return [fim_prompt(x, req.suffix) for x in ([p] if isinstance(p, str) else p)]  # type: ignore[union-attr]
    except ValueError as e:  # "prefix contains the control token ..." / "suffix contains ..."
        raise bad_request(str(e).replace("prefix", "prompt", 1), param="suffix" if str(e).startswith("suffix") else "prompt") from None


def fim_stop_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.token_to_id(t) for t in FIM_END_TOKENS]
    return [t for t in ids if t is not None]


def prompt_token_lists(tokenizer: Any, req: CompletionRequest, vocab_size: int) -> list[list[int]]:
    p: Any = req.prompt if req.suffix is None else _fim_prompts(tokenizer, req)
    if isinstance(p, str):
        lists = [tokenizer.encode(p)]
    elif all(isinstance(x, str) for x in p):
        lists = [tokenizer.encode(x) for x in p]  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        lists = [list(p)]  # type: ignore[arg-type]
    else:
        lists = [list(x) for x in p]  # type: ignore[arg-type]
    if len(lists) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(lists)}", param="prompt")
    for i, ids in enumerate(lists):
        if not ids:
            raise bad_request("the prompt is empty (it encodes to no tokens)", param="prompt")
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="prompt")
    return lists


class _LogprobBuilder:
    """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer: Any, offset: int) -> None:
        self.tok = tokenizer
        self.offset = offset  # text_offset of the next token

    def build(self, token_ids: list[int], entries: list[dict[int, Logprob] | None] | None) -> CompletionLogprobs:
        """Entries of None (the first prompt token) have no log-probs."""
        out = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries or []):
            if entry is None:
                token = self.tok.decode([tid])
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(self.offset)
                self.offset += len(token)
                continue
            lp = entry.get(tid)
            token = lp.decoded_token if lp is not None and lp.decoded_token is not None else self.tok.decode([tid])
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, -9999.0) if lp is not None else None)
            out.top_logprobs.append({(e.decoded_token or str(t)): max(e.logprob, -9999.0) for t, e in entry.items()})
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out

    def build_echo(
        self, prompt_ids: list[int], prompt_entries: list[dict[int, Logprob] | None] | None,
        token_ids: list[int], entries: list[dict[int, Logprob]] | None,
    ) -> CompletionLogprobs:  # fmt: skip
        """The prompt's tokens (when echoed) followed by the completion's."""
        head = self.build(prompt_ids, prompt_entries) if prompt_entries is not None else CompletionLogprobs()
        tail = self.build(token_ids, entries)
        return CompletionLogprobs(
            text_offset=head.text_offset + tail.text_offset, token_logprobs=head.token_logprobs + tail.token_logprobs,
            tokens=head.tokens + tail.tokens, top_logprobs=head.top_logprobs + tail.top_logprobs,
        )  # fmt: skip


def _check_request(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (ranking candidates is not supported)", param="best_of")
    if req.echo and req.suffix is not None:
        raise bad_request("echo cannot be combined with suffix (the prompt is rebuilt around the suffix)", param="echo")


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    engine = state.require_engine()
    _check_request(req)
    lists = await asyncio.to_thread(prompt_token_lists, engine.tokenizer, req, engine.vocab_size)
    echo_logprobs = req.echo and req.logprobs is not None
    if req.suffix is not None:  # the middle ends at the first FIM control token
        req = req.model_copy(update={"stop_token_ids": (req.stop_token_ids or []) + fim_stop_token_ids(engine.tokenizer)})
    subs = []
    for i, ids in enumerate(lists):
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, "prompt")
        params = build_sampling_params(
            req, engine.generation_defaults, max_tokens=max_tokens, logprobs=req.logprobs,
            vocab_size=engine.vocab_size, prompt_logprobs=req.logprobs if echo_logprobs else None,
        )  # fmt: skip
        subs.append(SubRequest(i, ids, params, i * req.n))
    priority = request_priority(req, raw)
    echo = [engine.tokenizer.decode(ids) if req.echo else "" for ids in lists]
    run = GenerationRun(state, state.admit(), subs, priority, raw)
    response_id = random_id("cmpl")
    # With echo and logprobs the offsets count from the prompt's start, else from the completion's.
    start = {s.prompt_index: 0 if echo_logprobs else len(echo[s.prompt_index]) for s in subs}
    builders = {s.first_choice + j: _LogprobBuilder(engine.tokenizer, start[s.prompt_index]) for s in subs for j in range(req.n)}
    if req.stream:
        return await _stream(state, req, run, response_id, echo, builders, lists if echo_logprobs else None)
    try:
        per_choice = await collect(run)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for index in range(run.num_choices):
        deltas = per_choice.get(index, [])
        ids = [t for d in deltas for t in d.token_ids]
        entries = [e for d in deltas for e in (d.logprobs or [])]
        last = next((d for d in reversed(deltas) if d.finish_reason), None)
        p = index // req.n
        prompt = (lists[p], _prompt_logprobs(run, p)) if echo_logprobs else ([], None)
        choices.append(
            CompletionChoice(
                index=index, text=echo[p] + "".join(d.text for d in deltas),
                logprobs=builders[index].build_echo(*prompt, ids, entries) if req.logprobs is not None else None,
                finish_reason=last.finish_reason if last else None,  # type: ignore[arg-type]
                stop_reason=last.stop_reason if last else None,
            )
        )  # fmt: skip
    body = CompletionResponse(id=response_id, model=engine.model_name, choices=choices, usage=run.usage())
    return JSONResponse(body.model_dump(mode="json"))


def _prompt_logprobs(run: GenerationRun, prompt_index: int) -> list[dict[int, Logprob] | None]:
    lps = run.prompt_logprobs.get(prompt_index)
    if lps is None:  # the engine reports them with the first output; a bug if missing
        raise OpenAIError("the engine returned no prompt logprobs", status_code=500, type="internal_error")
    return lps


async def _stream(
    state: ServerState, req: CompletionRequest, run: GenerationRun, response_id: str,
    echo: list[str], builders: dict[int, _LogprobBuilder], echo_ids: list[list[int]] | None,
) -> Response:  # fmt: skip
    model = state.require_engine().model_name
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    echoed: set[int] = set()
    deltas = run.deltas()
    try:
        first: ChoiceDelta | None = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)

    def chunk(d: ChoiceDelta) -> str | None:
        text = d.text
        p = d.index // req.n
        prompt: tuple[list[int], Any] = ([], None)
        if d.index not in echoed:
            echoed.add(d.index)
            text = echo[p] + text
            if echo_ids is not None:
                prompt = (echo_ids[p], _prompt_logprobs(run, p))
        lps = None
        if req.logprobs is not None and (d.token_ids or prompt[1] is not None):
            lps = builders[d.index].build_echo(*prompt, d.token_ids, d.logprobs)
        if not text and lps is None and d.finish_reason is None:
            return None
        choice = CompletionChoice(index=d.index, text=text, logprobs=lps,
                                  finish_reason=d.finish_reason, stop_reason=d.stop_reason)  # type: ignore[arg-type]  # fmt: skip
        c = CompletionChunk(id=response_id, created=created, model=model, choices=[choice],
                            usage=run.usage() if continuous else None)  # fmt: skip
        return sse(c.model_dump_json(exclude_none=True))

    def usage_chunk() -> list[str]:
        if not include_usage:
            return []
        c = CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=run.usage())
        return [sse(c.model_dump_json(exclude_none=True))]

    events = sse_events(deltas, lambda d: filter(None, [chunk(d)]), first=first, tail=usage_chunk)
    return RunStreamingResponse(events, run, deltas, headers=SSE_HEADERS)
