"""POST /v1/completions: raw prompts (text or token ids, one or several) on the engine.

Choice `i * n + j` is sample j of prompt i, as in OpenAI's API.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwenkit.engine.outputs import Logprob
from qwenkit.serve.errors import bad_request
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

MAX_PROMPTS = 64


def prompt_token_lists(tokenizer: Any, req: CompletionRequest, vocab_size: int) -> list[list[int]]:
    p = req.prompt
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

    def build(self, token_ids: list[int], entries: list[dict[int, Logprob]] | None) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries or []):
            lp = entry.get(tid)
            token = lp.decoded_token if lp is not None and lp.decoded_token is not None else self.tok.decode([tid])
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, -9999.0) if lp is not None else None)
            out.top_logprobs.append({(e.decoded_token or str(t)): max(e.logprob, -9999.0) for t, e in entry.items()})
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    engine = state.require_engine()
    if req.suffix is not None:
        raise bad_request("suffix (insertion) is not supported; use the FIM prompt format", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (ranking candidates is not supported)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, which are not supported", param="echo")
    lists = await asyncio.to_thread(prompt_token_lists, engine.tokenizer, req, engine.vocab_size)
    subs = []
    for i, ids in enumerate(lists):
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, "prompt")
        params = build_sampling_params(req, engine.generation_defaults, max_tokens=max_tokens, logprobs=req.logprobs)
        subs.append(SubRequest(i, ids, params, i * req.n))
    priority = request_priority(req, raw)
    echo = [engine.tokenizer.decode(ids) if req.echo else "" for ids in lists]
    run = GenerationRun(state, state.admit(), subs, priority, raw)
    response_id = random_id("cmpl")
    builders = {s.first_choice + j: _LogprobBuilder(engine.tokenizer, len(echo[s.prompt_index])) for s in subs for j in range(req.n)}
    if req.stream:
        return await _stream(state, req, run, response_id, echo, builders)
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
        choices.append(
            CompletionChoice(
                index=index, text=echo[index // req.n] + "".join(d.text for d in deltas),
                logprobs=builders[index].build(ids, entries) if req.logprobs is not None else None,
                finish_reason=last.finish_reason if last else None,  # type: ignore[arg-type]
                stop_reason=last.stop_reason if last else None,
            )
        )  # fmt: skip
    body = CompletionResponse(id=response_id, model=engine.model_name, choices=choices, usage=run.usage())
    return JSONResponse(body.model_dump(mode="json"))


async def _stream(
    state: ServerState, req: CompletionRequest, run: GenerationRun, response_id: str,
    echo: list[str], builders: dict[int, _LogprobBuilder],
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
        if d.index not in echoed:
            echoed.add(d.index)
            text = echo[d.index // req.n] + text
        lps = builders[d.index].build(d.token_ids, d.logprobs) if req.logprobs is not None and d.token_ids else None
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
