"""The FastAPI application: routes, API-key check, CORS, access logs, lifecycle.

`create_app(settings, engine_factory)` returns an app that starts answering at once (/health
200, /ready 503) while the engine loads in a background thread; generation endpoints answer
503 until then. On shutdown new requests get 503, in-flight ones finish within uvicorn's
graceful period (or are cancelled, which aborts them in the engine), then the engine stops.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Body, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenkit.serve import protocol as P
from qwenkit.serve.engine_client import EngineClient, load_engine_client
from qwenkit.serve.errors import OpenAIError, bad_request, install_error_handlers
from qwenkit.serve.metrics import CONTENT_TYPE
from qwenkit.serve.serving_chat import (
    check_model,
    create_chat_completion,
    render_prompt,
    template_messages,
    template_tools,
)
from qwenkit.serve.serving_completion import create_completion
from qwenkit.serve.serving_simple import simple_chat
from qwenkit.serve.settings import ServerSettings
from qwenkit.serve.state import ServerState

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("qwenkit.serve.access")

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = {"/", "/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/favicon.ico"}
ERRORS = {
    400: {"model": P.ErrorResponse, "description": "Invalid request (the field is in error.param)"},
    401: {"model": P.ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": P.ErrorResponse, "description": "Unknown model"},
    429: {"model": P.ErrorResponse, "description": "Queue full; retry after Retry-After seconds"},
    503: {"model": P.ErrorResponse, "description": "Model loading or server shutting down"},
    504: {"model": P.ErrorResponse, "description": "Request timed out"},
}


class AccessMiddleware:
    """API-key check (Bearer) on non-public paths, and one JSON access-log line per request."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        info: dict[str, Any] = {"status": None, "bytes": 0}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")[:128] or secrets.token_hex(8)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body":
                info["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            if self._denied(scope["path"], scope["method"], headers):
                err = OpenAIError("invalid or missing API key", status_code=401, type="authentication_error",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                await err.response()(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client")
            access_logger.info(json.dumps({
                "event": "access", "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "status": info["status"] or 499, "bytes": info["bytes"],
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                "client": f"{client[0]}:{client[1]}" if client else None,
            }))  # fmt: skip

    def _denied(self, path: str, method: str, headers: dict[str, str]) -> bool:
        if self.api_key is None or method == "OPTIONS" or path in PUBLIC_PATHS or path.startswith("/static/"):
            return False
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode())


def create_app(settings: ServerSettings, engine_factory: Callable[[], EngineClient] | None = None) -> FastAPI:
    if engine_factory is None:
        def engine_factory() -> EngineClient:
            return load_engine_client(
                settings.model, served_model_name=settings.served_model_name,
                max_num_seqs=settings.max_num_seqs, **settings.engine_args,
            )  # fmt: skip

    state = ServerState(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="qwenkit-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.shutting_down = True
            await asyncio.to_thread(loader.join)
            state.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="qwenkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Qwen2.5 models")  # fmt: skip
    app.state.qwenkit = state
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # outermost, so that 401s carry CORS headers too
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
            allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"],
        )  # fmt: skip
    _add_routes(app, state)
    _document_model_name(app, state)
    return app


def _document_model_name(app: FastAPI, state: ServerState) -> None:
    """Once the model is loaded, the served OpenAPI spec lists its name as the only valid
    `model` value (requests naming another model get 404)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base()
        if state.engine is None:
            app.openapi_schema = None  # not final until the model is known
            return schema
        for component in schema.get("components", {}).get("schemas", {}).values():
            prop = component.get("properties", {}).get("model")
            if prop is not None and "anyOf" in prop:
                prop["anyOf"] = [{"type": "string", "enum": [state.engine.model_name]}, {"type": "null"}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERRORS, tags=["openai"])
    async def chat_completions(req: P.ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERRORS, tags=["openai"])
    async def completions(req: P.CompletionRequest, raw: Request) -> Response:
        return await create_completion(state, req, raw)

    @app.get("/v1/models", response_model=P.ModelList, responses=ERRORS, tags=["openai"])
    async def models() -> P.ModelList:
        engine = state.require_engine()
        return P.ModelList(data=[P.ModelCard(id=engine.model_name, max_model_len=engine.max_model_len)])

    @app.post("/chat", response_model=P.SimpleChatResponse, responses=ERRORS, tags=["simple"])
    async def chat(req: P.SimpleChatRequest, raw: Request) -> Response:
        return await simple_chat(state, req, raw)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=ERRORS, tags=["tokenizer"])
    async def tokenize(req: P.TokenizeRequest = Body(...)) -> P.TokenizeResponse:  # noqa: B008
        check_model(state, req.model)
        engine = state.require_engine()
        tok = engine.tokenizer
        if isinstance(req, P.TokenizeChatRequest):
            tools = template_tools(P.ChatCompletionRequest(messages=req.messages, tools=req.tools)) if req.tools else None
            ids = await asyncio.to_thread(
                render_prompt, tok, template_messages(req.messages, tok, state.settings.media), tools,
                req.add_generation_prompt, req.continue_final_message,
            )  # fmt: skip
        else:
            ids = await asyncio.to_thread(tok.encode, req.prompt)
        return P.TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERRORS, tags=["tokenizer"])
    async def detokenize(req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        check_model(state, req.model)
        engine = state.require_engine()
        bad = next((t for t in req.tokens if t >= engine.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", param="tokens")
        return P.DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))

    @app.get("/health", response_model=P.HealthResponse, tags=["ops"])
    async def health() -> JSONResponse:
        """Liveness: 200 unless model loading failed or the engine died (a restart is the remedy)."""
        if state.error is not None:
            return JSONResponse({"status": "error", "detail": repr(state.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", response_model=P.HealthResponse, responses={503: {"model": P.HealthResponse}}, tags=["ops"])
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded and until shutdown begins."""
        status = state.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
