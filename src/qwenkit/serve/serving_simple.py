"""POST /chat, the seeds' simple endpoint: {"prompt": ...} -> {"response": ...}, on the same
engine and chat template as /v1/chat/completions."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwenkit.serve.generation import (
    ClientDisconnected,
    GenerationRun,
    SubRequest,
    build_sampling_params,
    collect,
    request_priority,
    resolve_max_tokens,
)
from qwenkit.serve.protocol import SamplingFields, SimpleChatRequest, SimpleChatResponse
from qwenkit.serve.serving_chat import CLIENT_CLOSED, render_prompt
from qwenkit.serve.state import ServerState
from qwenkit.serve.streaming import SSE_HEADERS, RunStreamingResponse, sse, sse_events


async def simple_chat(state: ServerState, req: SimpleChatRequest, raw: Request) -> Response:
    """{"prompt": ...} -> {"response": ...}; with "stream": true, SSE `data: {"response": delta}`."""
    engine = state.require_engine()
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": req.prompt}]
    prompt_ids = await asyncio.to_thread(render_prompt, engine.tokenizer, messages, None, True, False)
    room = engine.max_model_len - len(prompt_ids)
    max_tokens = resolve_max_tokens(min(req.max_tokens, max(room, 1)), len(prompt_ids), engine.max_model_len, "prompt")
    fields = SamplingFields(temperature=req.temperature, priority=req.priority)
    params = build_sampling_params(
        fields, engine.generation_defaults, max_tokens=max_tokens, logprobs=None, vocab_size=engine.vocab_size
    )
    run = GenerationRun(state, state.admit(), [SubRequest(0, prompt_ids, params, 0)], request_priority(fields, raw), raw)
    if not req.stream:
        try:
            per_choice = await collect(run)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        deltas = per_choice.get(0, [])
        reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)
        body = SimpleChatResponse(response="".join(d.text for d in deltas), finish_reason=reason, usage=run.usage())
        return JSONResponse(body.model_dump(mode="json"))

    stream = run.deltas()

    def pieces(d: Any) -> list[str]:
        out = [sse(json.dumps({"response": d.text}, ensure_ascii=False))] if d.text else []
        if d.finish_reason:
            out.append(sse(json.dumps({"finish_reason": d.finish_reason, "usage": run.usage().model_dump()})))
        return out

    return RunStreamingResponse(sse_events(stream, pieces), run, stream, headers=SSE_HEADERS)
