"""Domain errors of the service; `service.http_errors` maps each one to an HTTP status in a single table, so the
modules that raise them know nothing about HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client; ``code`` is the stable machine-readable name."""

    code = "internal_error"


class InvalidImageError(ServiceError):
    """The body is not an image Pillow can decode (empty, truncated, not an image)."""

    code = "invalid_image"


class PayloadTooLargeError(ServiceError):
    """The body is larger than the configured byte limit."""

    code = "payload_too_large"


class ImageTooLargeError(ServiceError):
    """The image has more pixels than the configured limit (decompression bombs included)."""

    code = "image_too_large"


class UnsupportedMediaTypeError(ServiceError):
    """The request's content type is not an image (nor multipart/form-data holding one)."""

    code = "unsupported_media_type"


class InvalidInputError(ServiceError):
    """An inference request body that does not follow its protocol (KServe v1, Open Inference Protocol v2): a
    missing or unknown tensor, a wrong datatype or shape, data that does not decode. The message names the row
    when one row is at fault."""

    code = "invalid_input"


class TooManyRowsError(ServiceError):
    """A request with more rows (images) than one request may carry."""

    code = "too_many_rows"


class UnauthorizedError(ServiceError):
    """An inference route called without the bearer token the server was started with."""

    code = "unauthorized"


class InvalidParameterError(ServiceError):
    """A query parameter or form field is missing or out of range."""

    code = "invalid_parameter"


class ModelNotFoundError(ServiceError):
    """A model name that this server does not serve."""

    code = "model_not_found"


class LoadFailedError(ServiceError):
    """A model repository load did not load every version of the model (the reasons are in the message; what was
    serving before keeps serving)."""

    code = "load_failed"


class OperatingCurveNotFoundError(ServiceError):
    """The model's manifest carries no accuracy/compute curve (format 2, or no routers)."""

    code = "operating_curve_not_found"


class ConflictError(ServiceError):
    """A change the server's settings forbid (e.g. moving a threshold that RIDE_DEFAULT_THRESHOLD fixes)."""

    code = "conflict"


class OverloadedError(ServiceError):
    """The server cannot take this request in time (queue full, expected wait too long, deadline passed, decoders
    busy); the client should retry later."""

    code = "overloaded"


class ClientClosedError(ServiceError):
    """The client went away before its answer was ready (nginx's 499): nothing is sent, the work is dropped."""

    code = "client_closed"


class NotReadyError(ServiceError):
    """The model is not loaded and warm yet, or the server is shutting down."""

    code = "not_ready"


class DefaultModelUnloadedError(NotReadyError):
    """The default model, which the unnamed routes serve, was unloaded: the server is not ready until it is
    loaded again (a temporary state of this server, not an unknown name: 503, not 404)."""


class ModelLoadError(RuntimeError):
    """The model folder cannot be served (bad manifest, hash mismatch, graph that onnxruntime rejects)."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type when empty): library errors can run to pages, replies and
    start-up errors are one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
