"""Operating points from the manifest's validation curve: RIDE_TARGET_COMPUTE, the per-request target_compute,
RIDE_DEFAULT_THRESHOLD above both, the curve's route and the admin route that moves the serving point. On the
bundled model (a real format-3 curve), with real sample images, in-process."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from export.manifest import MANIFEST_NAME, load_manifest
from service.api import create_app
from service.errors import ModelLoadError
from service.model import OnnxModel, load_model
from service.operating_points import BudgetError, choose_by_budget
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "cifar10-lt-ride4"
SAMPLE = (REPO / "models" / "samples" / "ship.jpg").read_bytes()
NAME = "cifar10-lt-ride4"
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def bundled() -> OnnxModel:
    return load_model(DEFAULT_MODEL, provider="cpu", shared_thread_pool=False)


Scenario = Callable[[httpx.AsyncClient], object]


def serve(app, scenario: Scenario):
    """Run ``scenario(client)`` against ``app`` with its batcher started and the model warm."""
    state = app.state.service

    async def run():
        await state.start()
        await state.warm_up()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await scenario(client)
        finally:
            await state.stop()

    return asyncio.run(run())


def test_the_bundled_curve_is_ordered_and_holds_the_default_threshold(bundled: OnnxModel) -> None:
    manifest = bundled.manifest
    curve = manifest.operating_curve
    assert manifest.format_version == 3 and curve is not None and curve.num_images == 200
    thresholds = [p.threshold for p in curve.points]
    assert thresholds == sorted(thresholds) and thresholds[0] == 0.0 and thresholds[-1] == 1.0
    assert curve.points[0].relative_compute == 1.0 and curve.points[0].mean_experts_used == 4.0
    assert manifest.cascade.default_threshold in thresholds


def test_a_budget_picks_the_largest_validation_compute_not_above_it(bundled: OnnxModel) -> None:
    curve = bundled.manifest.operating_curve
    for budget in (0.45, 0.5, 0.6, 0.8, 1.0):
        choice = choose_by_budget(curve, budget)
        below = [p.relative_compute for p in curve.points if p.relative_compute <= budget]
        assert choice.warning is None and choice.point.relative_compute == max(below)
    cheapest = min(p.relative_compute for p in curve.points)
    low = choose_by_budget(curve, cheapest / 2)
    assert low.point.relative_compute == cheapest and "below the cheapest operating point" in low.warning
    for outside in (0.0, -0.1, 1.01):
        with pytest.raises(BudgetError, match=r"\(0, 1\]"):
            choose_by_budget(curve, outside)


@pytest.mark.parametrize("value", ["0", "1.5", "-1", "nan"])
def test_a_target_compute_outside_0_1_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RIDE_TARGET_COMPUTE", value)
    with pytest.raises(ValidationError, match="target_compute"):
        Settings()


def test_target_compute_sets_the_serving_threshold(bundled: OnnxModel) -> None:
    app = create_app(Settings(model_dir=DEFAULT_MODEL, target_compute=0.5), model=bundled)
    expected = choose_by_budget(bundled.manifest.operating_curve, 0.5).point
    serving = app.state.service.default_model().default_threshold
    assert serving == expected.threshold != bundled.manifest.cascade.default_threshold

    async def scenario(client):
        return await client.post("/classify", content=SAMPLE, headers=JPEG), await client.get("/metrics")

    response, metrics = serve(app, scenario)
    assert response.status_code == 200 and float(response.headers["x-threshold"]) == expected.threshold
    assert f"ride_operating_threshold {expected.threshold!r}" in metrics.text
    assert f"ride_operating_expected_relative_compute {expected.relative_compute!r}" in metrics.text


def test_a_request_budget_picks_its_point_and_warns_below_the_cheapest(bundled: OnnxModel) -> None:
    app = create_app(Settings(model_dir=DEFAULT_MODEL), model=bundled)
    curve = bundled.manifest.operating_curve

    async def scenario(client):
        calls = ["?target_compute=0.5", "?target_compute=0.01", "?target_compute=0", "?target_compute=2", ""]
        return [await client.post(f"/classify{q}", content=SAMPLE, headers=JPEG) for q in calls]

    half, tiny, zero, two, plain = serve(app, scenario)
    assert float(half.headers["x-threshold"]) == choose_by_budget(curve, 0.5).point.threshold
    assert "x-target-compute-warning" not in half.headers
    assert float(tiny.headers["x-threshold"]) == choose_by_budget(curve, 0.01).point.threshold
    assert "below the cheapest operating point" in tiny.headers["x-target-compute-warning"]
    for refused in (zero, two):
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_parameter"
    assert float(plain.headers["x-threshold"]) == bundled.manifest.cascade.default_threshold


def test_default_threshold_overrides_both_budgets_and_the_admin_route(bundled: OnnxModel) -> None:
    settings = Settings(model_dir=DEFAULT_MODEL, default_threshold=0.25, target_compute=0.5, admin_routes=True)
    app = create_app(settings, model=bundled)

    async def scenario(client):
        budget = await client.post("/classify?target_compute=0.5", content=SAMPLE, headers=JPEG)
        own = await client.post("/classify?threshold=0.75", content=SAMPLE, headers=JPEG)
        both = await client.post("/classify?target_compute=0.5&threshold=0.75", content=SAMPLE, headers=JPEG)
        put = await client.put(f"/v2/models/{NAME}/operating-point", json={"threshold": 0.5})
        return budget, own, both, put

    budget, own, both, put = serve(app, scenario)
    assert float(budget.headers["x-threshold"]) == 0.25
    assert float(own.headers["x-threshold"]) == 0.75
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
    # Routes under /v2 answer errors in the protocol's shape: {"error": "<message>"}.
    assert put.status_code == 409 and "RIDE_DEFAULT_THRESHOLD" in put.json()["error"]


def test_the_curve_route_returns_the_manifest_curve_and_the_serving_point(bundled: OnnxModel) -> None:
    app = create_app(Settings(model_dir=DEFAULT_MODEL), model=bundled)

    async def scenario(client):
        return await client.get(f"/v2/models/{NAME}/operating-points"), await client.get(
            "/v2/models/other/operating-points"
        )

    found, unknown = serve(app, scenario)
    body = found.json()
    curve = bundled.manifest.operating_curve
    assert found.status_code == 200 and body["split"] == "validation" and body["num_images"] == 200
    assert body["points"] == json.loads(curve.model_dump_json())["points"]
    serving = body["serving"]
    assert serving["source"] == "manifest" and serving["pinned"] is False
    assert serving["threshold"] == bundled.manifest.cascade.default_threshold == serving["point"]["threshold"]
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]


def test_admin_routes_are_off_by_default(bundled: OnnxModel) -> None:
    app = create_app(Settings(model_dir=DEFAULT_MODEL), model=bundled)

    async def scenario(client):
        return await client.put(f"/v2/models/{NAME}/operating-point", json={"threshold": 0.5})

    response = serve(app, scenario)
    assert response.status_code in (404, 405)
    assert app.state.service.default_model().default_threshold == bundled.manifest.cascade.default_threshold


def test_an_admin_moves_the_serving_point_with_the_token(bundled: OnnxModel) -> None:
    settings = Settings(model_dir=DEFAULT_MODEL, admin_routes=True, admin_token="s3cret")
    app = create_app(settings, model=bundled)
    route = f"/v2/models/{NAME}/operating-point"
    bearer = {"Authorization": "Bearer s3cret"}
    curve = bundled.manifest.operating_curve

    async def scenario(client):
        replies = {
            "none": await client.put(route, json={"threshold": 0.5}),
            "wrong": await client.put(route, json={"threshold": 0.5}, headers={"Authorization": "Bearer nope"}),
            "both": await client.put(route, json={"threshold": 0.5, "target_compute": 0.5}, headers=bearer),
            "outside": await client.put(route, json={"target_compute": 0}, headers=bearer),
            "budget": await client.put(route, json={"target_compute": 0.6}, headers=bearer),
        }
        replies["after_budget"] = await client.post("/classify", content=SAMPLE, headers=JPEG)
        replies["threshold"] = await client.put(route, json={"threshold": 0.5}, headers=bearer)
        replies["after_threshold"] = await client.post("/classify", content=SAMPLE, headers=JPEG)
        replies["curve"] = await client.get(f"/v2/models/{NAME}/operating-points")
        return replies

    replies = serve(app, scenario)
    for refused in ("none", "wrong"):
        assert replies[refused].status_code == 401 and replies[refused].headers["www-authenticate"] == "Bearer"
    for invalid in ("both", "outside"):  # a bad body on a /v2 route: the protocol's 400
        assert replies[invalid].status_code == 400, replies[invalid].text
    expected = choose_by_budget(curve, 0.6).point
    assert replies["budget"].status_code == 200 and replies["budget"].json()["source"] == "admin"
    assert float(replies["after_budget"].headers["x-threshold"]) == expected.threshold
    assert replies["threshold"].json()["threshold"] == 0.5
    assert float(replies["after_threshold"].headers["x-threshold"]) == 0.5
    assert replies["curve"].json()["serving"]["threshold"] == 0.5


def test_a_format_2_model_serves_without_budgets(bundled: OnnxModel, tmp_path: Path) -> None:
    folder = tmp_path / NAME
    shutil.copytree(DEFAULT_MODEL, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    del data["operating_curve"]
    data["format_version"] = 2
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    old = load_manifest(folder)
    assert old.format_version == 2 and old.operating_curve is None
    model = load_model(folder, provider="cpu", shared_thread_pool=False)
    with pytest.raises(ModelLoadError, match="no operating curve"):
        create_app(Settings(model_dir=folder, target_compute=0.5), model=model)
    app = create_app(Settings(model_dir=folder), model=model)

    async def scenario(client):
        budget = await client.post("/classify?target_compute=0.5", content=SAMPLE, headers=JPEG)
        plain = await client.post("/classify", content=SAMPLE, headers=JPEG)
        return budget, plain, await client.get(f"/v2/models/{NAME}/operating-points")

    budget, plain, curve = serve(app, scenario)
    assert budget.status_code == 422 and "no operating curve" in budget.json()["error"]["message"]
    assert plain.status_code == 200 and float(plain.headers["x-threshold"]) == old.cascade.default_threshold
    assert curve.status_code == 404 and "no operating curve" in curve.json()["error"]
