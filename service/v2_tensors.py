"""Open Inference Protocol v2 tensors on the wire, JSON or binary (the binary tensor data extension).

A request body is a JSON object, optionally followed by a binary section: the ``Inference-Header-Content-Length``
header then gives the JSON's length, and each input with a ``binary_data_size`` parameter takes that many bytes
of the binary section, in the order of the inputs. Binary data is little-endian, row-major; a ``BYTES`` element is
a 4-byte little-endian length followed by its bytes. In JSON, ``data`` is a flat or nested array in row-major
order. Every malformed piece is an `InvalidInputError` (400) that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# wbits per Content-Encoding: gzip framing (31), zlib framing (15, what HTTP calls deflate).
_WBITS = {"gzip": 31, "deflate": 15}


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before its ``Content-Encoding`` (gzip or deflate, as tritonclient compresses), at most
    ``max_bytes`` once inflated: the body limit holds for what the server holds in memory, not for the wire.

    Raises:
        UnsupportedMediaTypeError: another encoding.
        InvalidInputError: data that does not inflate.
        PayloadTooLargeError: more than ``max_bytes`` inflated.
    """
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in _WBITS:
        raise UnsupportedMediaTypeError(f"content encoding {coding} is not supported: send gzip, deflate or none")
    inflater = zlib.decompressobj(_WBITS[coding])
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise InvalidInputError(f"the body does not inflate as {coding}: {error}") from None
    if len(inflated) > max_bytes:
        raise PayloadTooLargeError(f"the request body inflates to more than the limit of {max_bytes} bytes")
    return inflated


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The request's JSON object (parsed) and its binary section (empty without ``Inference-Header-Content-Length``).

    Raises:
        InvalidInputError: a bad header length, or JSON that does not parse to an object.
    """
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInputError(f"{HEADER_LENGTH} is not a number: {header_length[:32]!r}") from None
        if not 0 <= length <= len(body):
            raise InvalidInputError(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
        head, binary = body[:length], body[length:]
    try:
        parsed = json.loads(head)
    except (ValueError, RecursionError) as error:
        raise InvalidInputError(f"the inference request is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(parsed, dict):
        raise InvalidInputError("the inference request must be a JSON object")
    return parsed, binary


class BinarySection:
    """The binary section of a request, handed out to the inputs in order."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def take(self, size: object, tensor: str) -> bytes:
        """The next ``size`` bytes, for input ``tensor``."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInputError(f"input {tensor!r}: binary_data_size must be a non-negative integer")
        end = self._offset + size
        if end > len(self._data):
            raise InvalidInputError(
                f"input {tensor!r}: binary_data_size {size} runs past the end of the body "
                f"({len(self._data) - self._offset} bytes left)"
            )
        chunk = bytes(self._data[self._offset : end])
        self._offset = end
        return chunk

    def check_consumed(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise InvalidInputError(f"{left} bytes after the JSON object belong to no input's binary_data_size")


def split_bytes_elements(raw: bytes, tensor: str) -> list[bytes]:
    """The elements of a binary ``BYTES`` tensor (each: 4-byte little-endian length, then the bytes)."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidInputError(f"input {tensor!r}: BYTES element {len(elements)} has a truncated length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidInputError(f"input {tensor!r}: BYTES element {len(elements)} is shorter than its length")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """The binary form of a ``BYTES`` tensor."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in elements)


def _flat(data: object) -> Iterator[object]:
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def flatten(data: object, tensor: str) -> list[object]:
    """A JSON ``data`` array, nested or not, as its row-major elements."""
    if not isinstance(data, list):
        raise InvalidInputError(f"input {tensor!r}: data must be an array")
    try:
        return list(_flat(data))
    except RecursionError:
        raise InvalidInputError(f"input {tensor!r}: data is nested too deeply") from None


def base64_elements(elements: Sequence[object], tensor: str) -> list[bytes]:
    """JSON ``BYTES`` elements of encoded images: each a base64 string (JSON cannot carry raw bytes)."""
    decoded = []
    for row, element in enumerate(elements):
        if not isinstance(element, str):
            raise InvalidInputError(f"input {tensor!r}, row {row}: a BYTES element in JSON must be a base64 string")
        try:
            decoded.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError) as error:
            raise InvalidInputError(f"input {tensor!r}, row {row}: not valid base64 ({error})") from None
    return decoded


def float_elements(data: bytes | list[object], count: int, tensor: str) -> np.ndarray:
    """An ``FP32`` tensor's ``count`` elements, from its binary data or its JSON elements; all finite."""
    if isinstance(data, bytes):
        if len(data) != count * 4:
            raise InvalidInputError(
                f"input {tensor!r}: {len(data)} bytes of binary data, expected {count * 4} (FP32, {count} elements)"
            )
        values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    else:
        if len(data) != count:
            raise InvalidInputError(f"input {tensor!r}: {len(data)} elements of data, expected {count} for its shape")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data):
            raise InvalidInputError(f"input {tensor!r}: FP32 data must be numbers")
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            try:
                values = np.asarray(data, dtype=np.float32)
            except OverflowError:  # a JSON integer beyond any float
                raise InvalidInputError(f"input {tensor!r}: data holds a number too large for FP32") from None
    if not np.isfinite(values).all():
        raise InvalidInputError(f"input {tensor!r}: data holds NaN or infinite values")
    return values


def encode_binary(values: np.ndarray | Sequence[bytes]) -> bytes:
    """An output tensor's binary data: a numeric array little-endian, row-major; a list of elements as BYTES."""
    if isinstance(values, np.ndarray):
        return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
    return join_bytes_elements(values)
