"""The uploaded image: read from the request (multipart field ``file``, or a raw ``image/*`` body) and decoded
into the model's input, off the event loop when it is large."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import numpy as np
from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from service.decode_pool import DecodePool
from service.errors import InvalidParameterError, UnsupportedMediaTypeError
from service.images import ImageDecoder

# Images up to this size decode on the event loop (~0.1 ms); larger ones go to a thread so the loop stays free.
INLINE_DECODE_PIXELS = 128 * 128
# The request body in OpenAPI: FastAPI cannot infer it, because the endpoint reads the body itself.
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, without temporary files.

    Starlette spools a file part above 1 MiB to a temporary file: on a read-only file system (a hardened container)
    a 2 MB upload then failed with a 500. The body limit bounds every part, so parts stay in memory.
    """

    def __init__(self, headers: Headers, stream: AsyncGenerator[bytes, None], *, max_bytes: int) -> None:
        super().__init__(headers, stream, max_files=1, max_fields=8)
        self.spool_max_size = max_bytes + 1  # never rolled over to disk


async def read_image_bytes(request: Request, max_bytes: int) -> bytes:
    """The uploaded image: multipart field ``file``, or the raw body with an ``image/*`` content type; the body is at
    most ``max_bytes`` (`service.middleware.BodyLimitMiddleware` enforces it) and never touches the disk."""
    media_type = _media_type(request.headers.get("content-type"))
    if media_type.startswith("image/"):
        return await request.body()
    if media_type != "multipart/form-data":
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"content type {shown} is not an image: send image/* or multipart/form-data with a field 'file'"
        )
    try:
        form = await InMemoryMultiPartParser(request.headers, request.stream(), max_bytes=max_bytes).parse()
    except MultiPartException as error:
        raise HTTPException(status_code=400, detail=error.message) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidParameterError("multipart form has no file field 'file'")
        part_type = _media_type(upload.content_type)
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise UnsupportedMediaTypeError(f"form field 'file' has content type {part_type}, not an image")
        return await upload.read()
    finally:
        await form.close()


async def decode_upload(request: Request, decoder: ImageDecoder, pool: DecodePool, max_bytes: int) -> np.ndarray:
    """The request's image (a body of at most ``max_bytes``) as the model's normalised ``[3, H, W]`` input; the size
    is checked from the header before any pixel is decoded, and a large image waits for one of the ``pool``'s
    threads (503 when it is full)."""
    image = decoder.open(await read_image_bytes(request, max_bytes))
    width, height = image.size
    if width * height <= INLINE_DECODE_PIXELS:
        return decoder.to_array(image)
    return await pool.run(decoder.to_array, image)
