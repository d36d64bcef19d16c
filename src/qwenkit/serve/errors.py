"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

Every user-caused failure becomes a 4xx naming the offending field in `param`; only a bug in
qwenkit may produce a 500 (logged with its traceback, never shown to the client).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    """A request failure reported to the client as an OpenAI error body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status_code=400, param=param, code=code)


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "any"}
_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'user', 'content') -> 'messages.0.content'.

    Pydantic puts union-member tags in the location (a discriminator value such as 'user', or
    a type description such as 'constrained-str' / 'list[int]'); those are dropped.
    """
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "header", "path"):
            continue
        if isinstance(item, int):
            parts.append(str(item))
            continue
        text = str(item)
        if not _FIELD.fullmatch(text) or text in _TYPE_TAGS:
            continue
        if text in _ROLE_TAGS and parts and parts[-1].isdigit():
            continue
        parts.append(text)
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"malformed JSON body: {ctx.get('error', first.get('msg'))}", code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    if first.get("type") in ("missing", "model_attributes_type", "dict_type") and param is None:
        return bad_request("the request body must be a JSON object", code="invalid_body")
    # Of the errors on that field (one per union member), prefer a constraint over a type error.
    same = [e for e in errors if _loc_to_param(e.get("loc", ())) == param]
    best = min(same, key=lambda e: str(e.get("type", "")).endswith("_type"))
    where = f"'{param}'" if param else "the request body"
    extra = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return bad_request(f"invalid value for {where}: {best.get('msg', 'invalid value')}{extra}", param=param, code="invalid_value")


_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(
            str(exc.detail),
            status_code=exc.status_code,
            type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
            headers=dict(exc.headers or {}),
        )
        return err.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        err = OpenAIError("internal server error", status_code=500, type="internal_error")
        return err.response()


def sse_error(err: OpenAIError) -> str:
    """An error inside an already-started event stream (the status line is already sent)."""
    return f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
