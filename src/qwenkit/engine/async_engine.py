"""Online inference: an asyncio front end over one `LLMEngine` stepping in a background thread.

The engine is not thread-safe, so only the stepping thread touches it: `generate` and `abort`
post commands that the thread applies between steps. Outputs travel back to each request's
`asyncio.Queue` through `loop.call_soon_threadsafe`. torch releases the GIL inside its kernels,
so the event loop stays responsive while a step runs.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from qwenkit.engine.llm_engine import LLMEngine, PromptType
from qwenkit.engine.outputs import RequestOutput, RequestOutputKind
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[Callable[[], None]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._counter = itertools.count()
        self.errored: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model: str, **engine_args: Any) -> AsyncLLMEngine:
        return cls(LLMEngine.from_pretrained(model, **engine_args))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------------ public API
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield DELTA outputs of one request until it finishes. Leaving the iteration early
        (break, cancellation, client disconnect) aborts the request."""
        if self.errored is not None:
            raise RuntimeError("the engine loop died") from self.errored
        rid = request_id if request_id is not None else f"req-{next(self._counter)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream

        def add() -> None:
            self.engine.add_request(
                rid, prompt, sampling_params, priority=priority,
                output_kind=RequestOutputKind.DELTA,
            )  # fmt: skip

        self._post(add, on_error=stream.put)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._post(lambda: self.engine.abort_request(rid))

    async def abort(self, request_id: str) -> None:
        self._post(lambda: self.engine.abort_request(request_id))

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the stepping thread
    def _post(
        self,
        command: Callable[[], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        def run() -> None:
            try:
                command()
            except Exception as e:  # a bad request must not kill the loop
                if on_error is None:
                    raise
                on_error(e)

        with self._wakeup:
            self._commands.append(run)
            if self._thread is None:
                self._stopped = False
                self._thread = threading.Thread(target=self._loop, name="qwenkit-engine", daemon=True)
                self._thread.start()
            self._wakeup.notify()

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wakeup:
                    while not self._stopped and not self._commands and not engine.has_unfinished_requests():
                        self._wakeup.wait()
                    if self._stopped:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    command()
                for out in engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
        except BaseException as e:
            logger.exception("engine loop died")
            self.errored = e
            for stream in list(self._streams.values()):
                stream.put(RuntimeError(f"engine loop died: {e!r}"))
