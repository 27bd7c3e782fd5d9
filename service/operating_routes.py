"""The operating-point routes, of the model's latest version: its validation curve
(``GET /v2/models/{name}/operating-points``) and, for admins, the serving point
(``PUT /v2/models/{name}/operating-point``; `service.admin_auth`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cascade import Threshold
from export.manifest import OperatingPoint
from service import errors
from service.admin_auth import check_admin
from service.http_errors import error_responses
from service.model_version import ModelVersion
from service.operating_points import BudgetError, PinnedError, ServingPoint
from service.state import StateDep

OPERATING_POINTS_ROUTE = "/v2/models/{name}/operating-points"
OPERATING_POINT_ROUTE = "/v2/models/{name}/operating-point"


class ServingPointBody(BaseModel):
    threshold: float = Field(description="Threshold of a request that names neither a threshold nor a budget.")
    source: str = Field(
        description="Where it came from: manifest, default_threshold (RIDE_DEFAULT_THRESHOLD, fixed), "
        "target_compute (RIDE_TARGET_COMPUTE), admin, adaptive."
    )
    pinned: bool = Field(description="True when RIDE_DEFAULT_THRESHOLD fixes it (the admin route then answers 409).")
    point: OperatingPoint | None = Field(description="Its point on the validation curve (None: not on the curve).")
    warning: str | None = Field(None, description="Set when a budget below the cheapest point got the cheapest one.")


class OperatingPointsResponse(BaseModel):
    name: str
    version: str
    split: str = Field(description="The split the curve was measured on (validation).")
    num_images: int
    serving: ServingPointBody
    points: list[OperatingPoint] = Field(description="By increasing threshold: relative compute never grows.")


class OperatingPointRequest(BaseModel):
    """Exactly one of ``threshold`` and ``target_compute``."""

    model_config = ConfigDict(extra="forbid")

    threshold: Threshold | None = None
    target_compute: float | None = Field(None, gt=0.0, le=1.0, description="Compute budget in (0, 1].")

    @model_validator(mode="after")
    def _exactly_one(self) -> OperatingPointRequest:
        if (self.threshold is None) == (self.target_compute is None):
            raise ValueError("give exactly one of threshold and target_compute")
        return self


def _serving_body(served: ModelVersion, serving: ServingPoint, warning: str | None = None) -> ServingPointBody:
    return ServingPointBody(
        threshold=serving.threshold,
        source=serving.source,
        pinned=served.operating.pinned,
        point=serving.point,
        warning=warning,
    )


async def operating_points(name: str, state: StateDep) -> Any:
    served = state.table.resolve(name)
    curve = served.operating.curve
    if curve is None:
        raise errors.OperatingCurveNotFoundError(
            f"model {name!r} has no operating curve (manifest format 2, or no routers): re-export it, or add one "
            "with `python -m export curve`"
        )
    return OperatingPointsResponse(
        name=served.name,
        version=served.version,
        split=curve.split,
        num_images=curve.num_images,
        serving=_serving_body(served, served.operating.serving),
        points=curve.points,
    )


async def set_operating_point(name: str, body: OperatingPointRequest, request: Request, state: StateDep) -> Any:
    check_admin(request, state.settings)
    served = state.table.resolve(name)
    warning = None
    try:
        if body.threshold is not None:
            serving = served.operating.set_threshold(body.threshold)
        else:
            assert body.target_compute is not None
            warning = served.operating.set_budget(body.target_compute).warning
            serving = served.operating.serving
    except PinnedError as error:
        raise errors.ConflictError(str(error)) from None
    except BudgetError as error:
        raise errors.InvalidParameterError(str(error)) from None
    return _serving_body(served, serving, warning)


def add_operating_routes(app: FastAPI, *, admin: bool) -> None:
    """The curve's route, and with ``admin`` the route that moves the serving point."""
    app.add_api_route(
        OPERATING_POINTS_ROUTE,
        operating_points,
        response_model=OperatingPointsResponse,
        responses=error_responses(errors.ModelNotFoundError, errors.OperatingCurveNotFoundError),
        summary="The model's validation accuracy/compute curve and the serving operating point.",
    )
    if admin:
        app.add_api_route(
            OPERATING_POINT_ROUTE,
            set_operating_point,
            methods=["PUT"],
            response_model=ServingPointBody,
            responses=error_responses(
                errors.UnauthorizedError,
                errors.ModelNotFoundError,
                errors.ConflictError,
                errors.InvalidParameterError,
            ),
            summary="Admin: serve another operating point (a threshold, or the curve's point for a compute budget).",
        )
