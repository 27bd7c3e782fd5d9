"""The uploaded image: read from the request (multipart field ``file``, or a raw ``image/*`` body) and decoded
into the model's input, off the event loop when it is large."""

from __future__ import annotations

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

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


async def read_image_bytes(request: Request) -> bytes:
    """The uploaded image: multipart field ``file``, or the raw body with an ``image/*`` content type."""
    media_type = _media_type(request.headers.get("content-type"))
    if media_type.startswith("image/"):
        return await request.body()
    if media_type != "multipart/form-data":
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"content type {shown} is not an image: send image/* or multipart/form-data with a field 'file'"
        )
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidParameterError("multipart form has no file field 'file'")
        part_type = _media_type(upload.content_type)
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise UnsupportedMediaTypeError(f"form field 'file' has content type {part_type}, not an image")
        return await upload.read()


async def decode_upload(request: Request, decoder: ImageDecoder, pool: DecodePool) -> np.ndarray:
    """The request's image as the model's normalised ``[3, H, W]`` input; the size is checked from the header
    before any pixel is decoded, and a large image waits for one of the ``pool``'s threads (503 when it is full)."""
    image = decoder.open(await read_image_bytes(request))
    width, height = image.size
    if width * height <= INLINE_DECODE_PIXELS:
        return decoder.to_array(image)
    return await pool.run(decoder.to_array, image)
