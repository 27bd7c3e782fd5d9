"""Who may call the admin routes: they exist only with ``RIDE_ADMIN_ROUTES`` on, and require the bearer token
(``Authorization: Bearer <token>``) when one is set.

The token comes from one function, :func:`required_token`: ``RIDE_ADMIN_TOKEN`` when set, else the inference
routes' ``RIDE_API_KEY`` (`service.access`) when that is set, so that a server with a key never opens its admin
routes to anyone.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import UnauthorizedError
from service.settings import Settings


def required_token(settings: Settings) -> str | None:
    """The bearer token admin calls must carry (``RIDE_ADMIN_TOKEN``, else ``RIDE_API_KEY``), or None when none is
    required."""
    token = settings.admin_token if settings.admin_token is not None else settings.api_key
    return token.get_secret_value() if token is not None else None


def check_admin(request: Request, settings: Settings) -> None:
    """Raise UnauthorizedError unless ``request`` carries the required bearer token (if one is required)."""
    token = required_token(settings)
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise UnauthorizedError("this admin route needs the server's bearer token: Authorization: Bearer <token>")
