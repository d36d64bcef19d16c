"""Server-sent events, and a streaming response that always closes its `GenerationRun`."""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterable, Optional

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwenkit.serve.errors import OpenAIError, sse_error
from qwenkit.serve.generation import ChoiceDelta, ClientDisconnected

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def sse_events(
    deltas: AsyncIterator[ChoiceDelta],
    pieces: Callable[[ChoiceDelta], Iterable[str]],
    *,
    first: Optional[ChoiceDelta] = None,
    head: Iterable[str] = (),
    tail: Callable[[], Iterable[str]] = tuple,
) -> AsyncIterator[str]:
    """The event loop every streaming endpoint shares: `head`, then `pieces(d)` for `first` (a
    delta already taken to surface early errors as a status code) and every later delta, then
    `tail()` (e.g. the usage chunk, computed at the end) and ``[DONE]``. A client that went
    away ends the stream silently; an `OpenAIError` becomes one error event and ``[DONE]``."""
    for event in head:
        yield event
    try:
        if first is not None:
            for event in pieces(first):
                yield event
        async for d in deltas:
            for event in pieces(d):
                yield event
    except ClientDisconnected:
        return
    except OpenAIError as e:
        yield sse_error(e)
        yield sse("[DONE]")
        return
    for event in tail():
        yield event
    yield sse("[DONE]")


class RunStreamingResponse(StreamingResponse):
    """A `text/event-stream` response bound to a generation run.

    Whatever ends the response (the stream finished, the client went away, the server is
    shutting down and cancels the task) the run's delta iterator is closed, which aborts any
    engine request still running and releases the admission slot.
    """

    def __init__(self, content: AsyncIterator[str], run: Any, deltas: AsyncIterator[Any], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._content = content
        self._run = run
        self._deltas = deltas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.abandon()  # synchronous: works even inside a cancelled task group
            with anyio.CancelScope(shield=True):
                await self._content.aclose()  # type: ignore[attr-defined]
                await self._deltas.aclose()  # type: ignore[attr-defined]
                await self._run.close()
