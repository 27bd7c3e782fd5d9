"""Domain errors to HTTP: the one status table, the one error body, and the handlers FastAPI calls.

Every error a client can cause is a `service.errors.ServiceError`; :data:`ERROR_STATUS` is the only place that
maps them to status codes. A route declares the errors it can raise (:func:`error_responses`), which documents
them in OpenAPI, and the metrics create their status series from the same declaration (:func:`statuses`).
Every non-2xx reply, FastAPI's own 404/405/422 included, has the body ``{"error": {"code", "message",
"request_id"}}``, except on the Open Inference Protocol's /v2 routes: ``{"error": "<message>"}``, as the protocol
and its clients have it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.errors import (
    ClientClosedError,
    ConflictError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidInputError,
    InvalidParameterError,
    LoadFailedError,
    ModelNotFoundError,
    NotReadyError,
    OperatingCurveNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    TooManyRowsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from service.request_context import request_id_of
from service.schemas import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)

V2_PREFIX = "/v2"
# The one exception-to-status table.
ERROR_STATUS: dict[type[ServiceError], int] = {
    InvalidImageError: 400,
    InvalidInputError: 400,
    LoadFailedError: 400,
    UnauthorizedError: 401,
    ModelNotFoundError: 404,
    OperatingCurveNotFoundError: 404,
    ConflictError: 409,
    PayloadTooLargeError: 413,
    TooManyRowsError: 413,
    ImageTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidParameterError: 422,
    OverloadedError: 503,
    NotReadyError: 503,
    # Never reaches the client (it has gone); counted in the metrics as nginx counts a client that closed first.
    ClientClosedError: 499,
}
# Codes for the errors Starlette/FastAPI raise themselves (unknown route, wrong method, bad multipart).
HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def status_of(error: ServiceError) -> int:
    """The status of ``error``'s class (or of the nearest class in the table it derives from); 500 if none."""
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def statuses(*errors: type[ServiceError]) -> list[int]:
    """The distinct statuses of ``errors``, sorted."""
    return sorted({ERROR_STATUS[error] for error in errors})


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route that can raise ``errors``: each status with the error body."""
    return {status: {"model": ErrorBody} for status in statuses(*errors)}


def speaks_v2(path: str) -> bool:
    """Whether ``path`` is an Open Inference Protocol v2 route, whose errors have the protocol's own body."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str, *, path: str = "", request_id: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "request_id"}}``; on /v2 routes the protocol's ``{"error": "<message>"}``
    (clients such as tritonclient read the message from it)."""
    if speaks_v2(path):
        return {"error": message}
    return ErrorBody(error=ErrorDetail(code=code, message=message, request_id=request_id)).model_dump(exclude_none=True)


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
    request_id: str | None = None,
) -> JSONResponse:
    body = error_body(code, message, path=path, request_id=request_id)
    return JSONResponse(body, status_code=status, headers=headers)


# A request with a thousand unknown parameters got a 38 kB reply listing each one: the first few say enough.
MAX_PROBLEMS_LISTED = 5
MAX_LOCATION_CHARS = 64


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    problems = error.errors()
    for item in problems[:MAX_PROBLEMS_LISTED]:
        if item.get("type") == "json_invalid":  # its location is a character offset, not a field
            detail = item.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON")
            continue
        location = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{location[:MAX_LOCATION_CHARS] or 'request'}: {item.get('msg', 'invalid')}")
    if len(problems) > MAX_PROBLEMS_LISTED:
        parts.append(f"and {len(problems) - MAX_PROBLEMS_LISTED} more problems")
    return "; ".join(parts) or "invalid request"


def _reply(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return error_response(
        status, code, message, headers, path=request.url.path, request_id=request_id_of(request.scope)
    )


def register_error_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    """Answer every error with the one error body (the protocol's on /v2 routes); 503s carry ``Retry-After``."""
    retry_after = {"Retry-After": str(retry_after_s)}

    async def on_service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        status = status_of(error)
        if isinstance(error, PayloadTooLargeError):
            # What is left of a body too large was discarded up to a bound (service.middleware): do not read on.
            return _reply(request, status, error.code, str(error), {"Connection": "close"})
        if isinstance(error, UnauthorizedError):
            return _reply(request, status, error.code, str(error), {"WWW-Authenticate": "Bearer"})
        return _reply(request, status, error.code, str(error), retry_after if status == 503 else None)

    async def on_validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        # The v2 protocol's clients expect a 400 for a request they got wrong.
        status = 400 if speaks_v2(request.url.path) else 422
        return _reply(request, status, InvalidParameterError.code, _validation_message(error))

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        code = HTTP_ERROR_CODES.get(error.status_code, "http_error")
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _reply(request, error.status_code, code, message, error.headers)

    async def on_client_disconnect(request: Request, error: Exception) -> Response:
        # Starlette raises this when the client leaves in the middle of its body: not the server's error.
        return await on_service_error(request, ClientClosedError("the client disconnected while sending its body"))

    async def on_unexpected_error(request: Request, error: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return _reply(request, 500, "internal_error", "internal server error")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(Exception, on_unexpected_error)
