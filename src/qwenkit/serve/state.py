"""Process-wide server state: the engine (once loaded), metrics, admission control."""
from __future__ import annotations

import logging
from typing import Callable

from qwenkit.serve.engine_client import EngineClient, EngineStats
from qwenkit.serve.errors import OpenAIError
from qwenkit.serve.metrics import ServerMetrics
from qwenkit.serve.settings import ServerSettings

logger = logging.getLogger(__name__)


class ServerState:
    """Lifecycle: loading -> ready -> shutting_down (or error if loading failed).

    Admission: a generation request holds one slot from `admit()` to `release()`; at most
    `settings.max_in_flight` are held at once (429 beyond, 503 while not ready).
    """

    def __init__(self, settings: ServerSettings, engine_factory: Callable[[], EngineClient]) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.engine: EngineClient | None = None
        self.load_error: BaseException | None = None
        self.shutting_down = False
        self.in_flight = 0
        self.metrics = ServerMetrics(settings.served_model_name or settings.model or "model", self.stats)

    # ------------------------------------------------------------------ lifecycle
    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.shutting_down:
            return "shutting_down"
        return "ready" if self.engine is not None else "loading"

    @property
    def error(self) -> BaseException | None:
        """A failed load, or an engine that can no longer step (its thread died)."""
        return self.load_error or getattr(self.engine, "errored", None)

    def load(self) -> None:
        """Build the engine (runs in a background thread at startup)."""
        try:
            engine = self.engine_factory()
        except BaseException as e:  # reported by /health and /ready
            logger.exception("model loading failed")
            self.load_error = e
            return
        self.metrics.model_name = engine.model_name
        self.engine = engine
        logger.info("model %s ready (max_model_len %d)", engine.model_name, engine.max_model_len)
        if self.settings.structured_warmup:
            try:
                engine.warm_up_structured_output()
            except ImportError:
                logger.warning("xgrammar is not installed: response_format / forced tool_choice are unavailable")
            except Exception:  # structured output stays available lazily
                logger.exception("grammar compiler warm-up failed")

    def shutdown(self) -> None:
        self.shutting_down = True
        if self.engine is not None:
            self.engine.shutdown()

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    # ------------------------------------------------------------------ admission
    def require_engine(self) -> EngineClient:
        if self.shutting_down:
            raise OpenAIError("the server is shutting down", status_code=503, type="service_unavailable",
                              headers={"Retry-After": "5"})  # fmt: skip
        if self.engine is None:
            detail = "model failed to load" if self.load_error is not None else "the model is still loading"
            raise OpenAIError(detail, status_code=503, type="service_unavailable", headers={"Retry-After": "5"})
        if self.error is not None:
            raise OpenAIError(f"the engine stopped: {self.error}", status_code=503, type="service_unavailable")
        return self.engine

    def admit(self) -> EngineClient:
        engine = self.require_engine()
        if self.in_flight >= self.settings.max_in_flight:
            self.metrics.request_rejected.labels(self.metrics.model_name, "queue_full").inc()
            raise OpenAIError(
                f"server is at capacity ({self.in_flight} requests in flight); retry later",
                status_code=429, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"},
            )  # fmt: skip
        self.in_flight += 1
        self.metrics.in_flight.labels(self.metrics.model_name).set(self.in_flight)
        return engine

    def release(self) -> None:
        assert self.in_flight > 0, "release() without admit()"
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.metrics.model_name).set(self.in_flight)
