"""The Open Inference Protocol's model repository extension, as admin routes (`service.admin_auth`; added only with
``RIDE_ADMIN_ROUTES`` on):

- ``POST /v2/repository/index``: every model version in the repository, ``{"name", "version", "state", "reason"}``
  each, state ``READY`` or ``UNAVAILABLE``; the request body ``{"ready": true}`` keeps only the ready ones;
- ``POST /v2/repository/models/{name}/load``: (re)load the model's versions (new and changed folders loaded,
  removed ones unloaded); 200 with an empty body, or 400 ``{"error": ...}`` naming each version that failed
  (what served before serves on);
- ``POST /v2/repository/models/{name}/unload``: stop serving every version of the model; 200 with an empty body.

Errors have the protocol's body ``{"error": "<message>"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service import errors
from service.admin_auth import check_admin
from service.state import StateDep
from service.v2_protocol import v2_error_responses

INDEX_ROUTE = "/v2/repository/index"
LOAD_ROUTE = "/v2/repository/models/{name}/load"
UNLOAD_ROUTE = "/v2/repository/models/{name}/unload"


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})

    ready: bool = Field(False, description="true: list only the model versions ready for inference.")


class RepositoryIndexEntry(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "cifar10-lt-ride4", "version": "2", "state": "UNAVAILABLE", "reason": "..."}]
        }
    )

    name: str
    version: str | None = Field(description="None for a model folder that holds no version folder (see reason).")
    state: str = Field(description="READY (served) or UNAVAILABLE.")
    reason: str = Field(description="Why it is unavailable (or why a READY version is an older load); else empty.")


class RepositoryLoadRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{}]})

    parameters: dict[str, Any] | None = Field(
        None, description="None are supported (Triton's config and file overrides are not): give none."
    )


class RepositoryUnloadRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"parameters": {"unload_dependents": False}}]})

    parameters: dict[str, Any] | None = Field(
        None, description="unload_dependents is accepted (a model here has no dependents); no other."
    )


def _refuse_parameters(parameters: dict[str, Any] | None, accepted: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(parameters or {}) - set(accepted))
    if unknown:
        raise errors.InvalidInputError(f"unsupported parameters: {', '.join(unknown)}")


async def repository_index(
    request: Request, state: StateDep, body: RepositoryIndexRequest | None = None
) -> list[RepositoryIndexEntry]:
    check_admin(request, state.settings)
    ready_only = body.ready if body is not None else False
    return [
        RepositoryIndexEntry(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in await state.loader.index(ready_only=ready_only)
    ]


async def load(name: str, request: Request, state: StateDep, body: RepositoryLoadRequest | None = None) -> Response:
    check_admin(request, state.settings)
    _refuse_parameters(body.parameters if body is not None else None)
    await state.loader.load(name)
    return Response(status_code=200)


async def unload(name: str, request: Request, state: StateDep, body: RepositoryUnloadRequest | None = None) -> Response:
    check_admin(request, state.settings)
    _refuse_parameters(body.parameters if body is not None else None, accepted=("unload_dependents",))
    await state.loader.unload(name)
    return Response(status_code=200)


def add_repository_routes(app: FastAPI) -> None:
    """The repository extension's routes (admin routes: add them only when those are on)."""
    app.add_api_route(
        INDEX_ROUTE,
        repository_index,
        methods=["POST"],
        response_model=list[RepositoryIndexEntry],
        responses=v2_error_responses(errors.UnauthorizedError),
        summary="Admin: every model version in the repository, READY or UNAVAILABLE (with the reason).",
    )
    app.add_api_route(
        LOAD_ROUTE,
        load,
        methods=["POST"],
        response_class=Response,
        responses={
            200: {"description": "Loaded (empty body).", "content": {"application/json": {"example": ""}}},
            **v2_error_responses(
                errors.UnauthorizedError, errors.ModelNotFoundError, errors.LoadFailedError, errors.InvalidInputError
            ),
        },
        summary="Admin: load the model's versions anew (verified and warmed before they serve; a failure changes "
        "nothing).",
    )
    app.add_api_route(
        UNLOAD_ROUTE,
        unload,
        methods=["POST"],
        response_class=Response,
        responses={
            200: {"description": "Unloaded (empty body).", "content": {"application/json": {"example": ""}}},
            **v2_error_responses(errors.UnauthorizedError, errors.ModelNotFoundError, errors.InvalidInputError),
        },
        summary="Admin: stop serving the model (requests running on it finish first).",
    )
