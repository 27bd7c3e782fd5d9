"""The OpenAPI document, corrected where FastAPI's defaults would not tell the truth."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.http_errors import speaks_v2

VALIDATION_STATUS = "422"


def _cannot_fail_validation(path: str, operation: dict[str, Any]) -> bool:
    # A path parameter of type string matches whatever the route matched; the /v2 routes answer 400 instead.
    parameters = operation.get("parameters", [])
    only_path_strings = all(p["in"] == "path" and p.get("schema", {}).get("type") == "string" for p in parameters)
    return speaks_v2(path) or (only_path_strings and "requestBody" not in operation)


def truthful_openapi(app: FastAPI) -> None:
    """FastAPI lists a 422 on every route with a parameter; it is taken off the routes that can never send one."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if _cannot_fail_validation(path, operation):
                        operation["responses"].pop(VALIDATION_STATUS, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
