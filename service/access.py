"""Who may call the inference routes: an optional bearer token (``RIDE_API_KEY``) and optional CORS
(``RIDE_CORS_ORIGINS``), both off by default.

The token guards only the routes that run the model (`require_token` is their dependency): probes, metadata,
``/metrics`` and the docs stay open, so that load balancers, Prometheus and Kubernetes need no secret.
"""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from service.errors import UnauthorizedError
from service.request_context import REQUEST_ID_HEADER

BEARER = "bearer"


async def require_token(request: Request) -> None:
    """
    Raises:
        UnauthorizedError: the server has a token and the request does not carry it as ``Authorization: Bearer``.
    """
    key = request.app.state.service.settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time: the time taken must not tell how much of a guess was right.
    if scheme.lower() != BEARER or not secrets.compare_digest(given.strip().encode(), key.get_secret_value().encode()):
        raise UnauthorizedError("this route needs the server's token: send Authorization: Bearer <token>")


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Answer browsers' CORS preflights and mark responses for ``origins`` (nothing when there are none)."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER, "Inference-Header-Content-Length"],
        expose_headers=[REQUEST_ID_HEADER, "Inference-Header-Content-Length", "X-Experts-Used", "Server-Timing"],
    )
