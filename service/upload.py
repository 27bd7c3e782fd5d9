"""The uploaded images of /classify: read from the request (multipart fields ``file``, or a raw ``image/*`` or
``application/octet-stream`` body); `service.rows` decodes them."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import InvalidParameterError, UnsupportedMediaTypeError
from service.rows import check_row_count

RAW_BYTES = "application/octet-stream"
# The request body in OpenAPI: FastAPI cannot infer it, because the endpoint reads the body itself.
IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One image, or several (a batch, up to RIDE_MAX_REQUEST_ROWS).",
                        }
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
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

    def __init__(
        self, headers: Headers, stream: AsyncGenerator[bytes, None], *, max_bytes: int, max_files: int
    ) -> None:
        super().__init__(headers, stream, max_files=max_files, max_fields=8)
        self.spool_max_size = max_bytes + 1  # never rolled over to disk


def _too_many_files(error: MultiPartException) -> bool:
    return error.message.startswith("Too many files")


async def read_images(request: Request, max_bytes: int, max_files: int) -> list[bytes]:
    """The uploaded images: multipart fields ``file`` (up to ``max_files`` of them), or the raw body with an
    ``image/*`` or ``application/octet-stream`` content type; the body is at most ``max_bytes``
    (`service.middleware.BodyLimitMiddleware` enforces it) and never touches the disk.

    Raises:
        UnsupportedMediaTypeError: another content type, or a part that is not an image.
        InvalidParameterError: no ``file`` field.
        TooManyRowsError: more than ``max_files`` files.
    """
    media_type = _media_type(request.headers.get("content-type"))
    if media_type.startswith("image/") or media_type == RAW_BYTES:
        return [await request.body()]
    if media_type != "multipart/form-data":
        shown = media_type or "none"
        raise UnsupportedMediaTypeError(
            f"content type {shown} is not an image: send image/*, application/octet-stream or multipart/form-data "
            "with fields 'file'"
        )
    parser = InMemoryMultiPartParser(request.headers, request.stream(), max_bytes=max_bytes, max_files=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if _too_many_files(error):
            check_row_count(max_files + 1, max_files)
        raise HTTPException(status_code=400, detail=error.message) from None
    try:
        uploads = form.getlist("file")
        if not uploads or not all(isinstance(upload, UploadFile) for upload in uploads):
            raise InvalidParameterError("multipart form has no file field 'file'")
        images = []
        for row, upload in enumerate(uploads):
            assert isinstance(upload, UploadFile)
            part_type = _media_type(upload.content_type)
            if part_type and not (part_type.startswith("image/") or part_type == RAW_BYTES):
                where = f"form field 'file' (row {row})" if len(uploads) > 1 else "form field 'file'"
                raise UnsupportedMediaTypeError(f"{where} has content type {part_type}, not an image")
            images.append(await upload.read())
        return images
    finally:
        await form.close()
