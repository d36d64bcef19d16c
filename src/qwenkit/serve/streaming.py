"""Server-sent events, and a streaming response that always closes its `GenerationRun`."""
from __future__ import annotations

from typing import Any, AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: str) -> str:
    return f"data: {data}\n\n"


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
