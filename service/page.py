"""``GET /``: a page to try an image. Its HTML, script and stylesheet are files in ``service/static``, served by
the server itself under ``/static`` (no CDN: it works on an air-gapped host), and the page's Content-Security-Policy
lets it load nothing from elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Images are shown from blob: URLs the page makes of the chosen files.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'"


async def index() -> Response:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


def add_page(app: FastAPI) -> None:
    """The page at ``/`` and its assets under ``/static``."""
    app.add_api_route(
        "/",
        index,
        response_class=Response,
        responses={
            200: {
                "description": "The page.",
                "content": {"text/html": {"schema": {"type": "string"}, "example": "<!doctype html>..."}},
            }
        },
        summary="A page to try an image: top-k labels, experts used, compute saved, timing.",
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
