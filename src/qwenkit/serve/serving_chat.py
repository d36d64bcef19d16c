"""POST /v1/chat/completions on the engine.

A request becomes: messages (+ tools) rendered by the model's own chat template -> token ids;
sampling parameters; optionally a grammar (response_format, tool_choice "required" / named),
compiled here and applied by the engine to each sequence; the Hermes tool-call parser on the
output when tools are in play.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from qwenkit.engine.outputs import Logprob
from qwenkit.sampling_params import StructuredOutputsParams
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
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    ToolMessage,
    TopLogprob,
    random_id,
)
from qwenkit.serve.state import ServerState
from qwenkit.serve.streaming import SSE_HEADERS, RunStreamingResponse, sse, sse_events
from qwenkit.serve.structured import StructuredOutputError, chat_structured_outputs, check_json_schema
from qwenkit.serve.tool_parser import HermesToolParser
from qwenkit.serve.vision import MediaSettings, load_images, split_messages

CLIENT_CLOSED = 499  # nginx's "client closed request", for the access log


def check_model(state: ServerState, model: str | None) -> None:
    engine = state.require_engine()
    if model is not None and model != engine.model_name:
        raise OpenAIError(
            f"the model '{model}' does not exist; this server serves '{engine.model_name}'",
            status_code=404, type="invalid_request_error", param="model", code="model_not_found",
        )  # fmt: skip


# ============================================================================ prompt
def _content(content: Any) -> Any:
    if content is None or isinstance(content, str):
        return content
    return [part.model_dump(exclude_none=True) for part in content]


def template_messages(messages: list[Any], tokenizer: Any = None, media: MediaSettings | None = None) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts HF chat templates expect (tool-call arguments as objects;
    content parts joined as text, or kept as parts for templates that read them)."""
    return chat_messages(messages, tokenizer, media or MediaSettings(limit_images=2**31))[0]


def chat_messages(messages: list[Any], tokenizer: Any, media: MediaSettings) -> tuple[list[dict[str, Any]], list[Any]]:
    """(template messages, the image parts in order, not yet loaded)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _content(m.content)}
        if isinstance(m, AssistantMessage) and m.tool_calls:
            calls = []
            for tc in m.tool_calls:
                try:
                    args: Any = json.loads(tc.function.arguments)
                except ValueError:
                    args = tc.function.arguments
                calls.append({"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if isinstance(m, ToolMessage):
            d["tool_call_id"], d["name"] = m.tool_call_id, m.name
        if getattr(m, "reasoning_content", None):
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return split_messages(tokenizer, out, media)


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        fn = tool.function
        if fn.parameters is not None:
            try:
                check_json_schema(fn.parameters, f"tools.{i}.function.parameters")
            except StructuredOutputError as e:
                raise bad_request(str(e), param=e.param, code="invalid_tool_schema") from None
        tools.append({"type": "function", "function": fn.model_dump(exclude_none=True)})
    return tools


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool, continue_final_message: bool,
) -> list[int]:  # fmt: skip
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true",
            param="continue_final_message",
        )  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )  # fmt: skip
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
    return tokenizer.encode(text)


# ============================================================================ plan
@dataclass
class ChatPlan:
    prompt_ids: list[int]
    parse_tools: bool
    parallel_tool_calls: bool
    structured_outputs: StructuredOutputsParams | None
    tool_names: tuple[str, ...] = ()
    multi_modal_data: dict[str, Any] | None = None  # {"image": [PIL images]} for vision models

    def parser(self) -> HermesToolParser:
        return HermesToolParser(parallel_tool_calls=self.parallel_tool_calls, tool_names=self.tool_names)


def plan_chat(state: ServerState, req: ChatCompletionRequest) -> ChatPlan:
    """Everything that can fail on the request's content (runs in a worker thread)."""
    engine = state.require_engine()
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    use_tools = bool(req.tools) and req.tool_choice != "none"
    tools = template_tools(req) if use_tools else None
    if req.tools and not use_tools:
        template_tools(req)  # still validate the schemas
    media = state.settings.media
    messages, image_parts = chat_messages(req.messages, engine.tokenizer, media)
    prompt_ids = render_prompt(
        engine.tokenizer, messages, tools, req.add_generation_prompt, req.continue_final_message,
    )  # fmt: skip
    structured = chat_structured_outputs(engine, req)
    images = load_images(engine, engine.model_name, image_parts, media)
    json_output = req.response_format is not None and req.response_format.type != "text"
    names = tuple(t.function.name for t in req.tools or ())
    mm = {"image": images} if images else None
    return ChatPlan(prompt_ids, use_tools and not json_output, req.parallel_tool_calls, structured, names, mm)


# ============================================================================ output pieces
def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, Logprob]] | None, k: int) -> list[TokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries or []):
        lp = entry.get(tid)
        top = sorted((e for e in entry.items() if e[1].rank is not None), key=lambda e: e[1].rank or 0)[:k]
        out.append(
            TokenLogprob(
                token=_token_str(tokenizer, tid, lp), logprob=_finite(lp.logprob if lp else float("-inf")),
                bytes=list(tokenizer.token_bytes(tid)) if tid < len(tokenizer) else [],
                top_logprobs=[
                    TopLogprob(token=_token_str(tokenizer, t, e), logprob=_finite(e.logprob),
                               bytes=list(tokenizer.token_bytes(t)) if t < len(tokenizer) else [])
                    for t, e in top
                ],
            )
        )  # fmt: skip
    return out


def _token_str(tokenizer: Any, tid: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([tid]) if tid < len(tokenizer) else ""


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf


def _finish(reason: str | None, num_tool_calls: int) -> str | None:
    if reason == "stop" and num_tool_calls:
        return "tool_calls"
    return reason


# ============================================================================ handler
async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    engine = state.require_engine()
    plan = await asyncio.to_thread(plan_chat, state, req)
    max_tokens = resolve_max_tokens(req.max_new_tokens, len(plan.prompt_ids), engine.max_model_len, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(
        req, engine.generation_defaults, max_tokens=max_tokens, logprobs=k, vocab_size=engine.vocab_size,
        structured_outputs=plan.structured_outputs,
    )  # fmt: skip
    priority = request_priority(req, raw)
    run = GenerationRun(state, state.admit(), [SubRequest(0, plan.prompt_ids, params, 0, plan.multi_modal_data)], priority, raw)
    response_id = random_id("chatcmpl")
    if req.stream:
        return await _stream(state, req, plan, run, response_id)
    try:
        per_choice = await collect(run)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    tok = engine.tokenizer
    for index in range(run.num_choices):
        deltas = per_choice.get(index, [])
        text = "".join(d.text for d in deltas)
        reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)
        stop_reason = next((d.stop_reason for d in reversed(deltas) if d.finish_reason), None)
        message = ChatMessageOut(content=text)
        num_calls = 0
        if plan.parse_tools:
            parser = plan.parser()
            parser.feed(text)
            parser.finish()
            parsed = parser.result()
            message = ChatMessageOut(
                content=parsed.content,
                tool_calls=[ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.tool_calls],
            )  # fmt: skip
            num_calls = len(parsed.tool_calls)
        logprobs = None
        if k is not None:
            ids = [t for d in deltas for t in d.token_ids]
            entries = [e for d in deltas for e in (d.logprobs or [])]
            logprobs = ChoiceLogprobs(content=chat_logprobs(tok, ids, entries, k))
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                  finish_reason=_finish(reason, num_calls), stop_reason=stop_reason))  # fmt: skip
    body = ChatCompletionResponse(id=response_id, model=engine.model_name, choices=choices, usage=run.usage())
    return JSONResponse(body.model_dump(mode="json"))


async def _stream(
    state: ServerState, req: ChatCompletionRequest, plan: ChatPlan, run: GenerationRun, response_id: str
) -> Response:
    engine = state.require_engine()
    created = int(time.time())
    model = engine.model_name
    k = (req.top_logprobs or 0) if req.logprobs else None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)
    parsers = {i: plan.parser() if plan.parse_tools else None for i in range(run.num_choices)}
    deltas = run.deltas()
    try:  # wait for the first delta, so that errors before it are plain HTTP errors
        first: ChoiceDelta | None = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)

    def chunk(choices: list[ChatChunkChoice], usage: bool = False) -> str:
        c = ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices,
                                usage=run.usage() if usage or continuous else None)  # fmt: skip
        return sse(c.model_dump_json(exclude_none=True))

    def pieces(d: ChoiceDelta) -> list[str]:
        parser = parsers[d.index]
        out = []
        content: str | None = d.text
        calls: list[DeltaToolCall] | None = None
        if parser is not None:
            pd = parser.feed(d.text)
            if d.finish_reason is not None:
                end = parser.finish()
                pd.content += end.content
                pd.tool_calls += end.tool_calls
            content = pd.content
            calls = [
                DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                              function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                for c in pd.tool_calls
            ] or None  # fmt: skip
        lps = ChoiceLogprobs(content=chat_logprobs(engine.tokenizer, d.token_ids, d.logprobs, k)) if k is not None and d.token_ids else None
        if content or calls or lps:
            out.append(chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=content or None, tool_calls=calls), logprobs=lps)]))
        if d.finish_reason is not None:
            n_calls = parser.num_tool_calls if parser is not None else 0
            out.append(chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=_finish(d.finish_reason, n_calls))]))
        return out

    events = sse_events(
        deltas, pieces, first=first,
        head=[chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(run.num_choices)],
        tail=lambda: [chunk([], usage=True)] if include_usage else [],
    )  # fmt: skip
    return RunStreamingResponse(events, run, deltas, headers=SSE_HEADERS)
