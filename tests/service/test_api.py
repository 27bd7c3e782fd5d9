"""The app in-process (no lifespan, so never warm): readiness, error shape, own registry, OpenAPI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from service.api import create_app
from service.settings import Settings


def request_all(app, calls: list[tuple[str, str]]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # runs no lifespan: the model is loaded but never warmed
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.request(method, path, content=b"x", headers={"content-type": "image/png"})
                for method, path in calls
            ]

    return asyncio.run(scenario())


def test_not_ready_until_warm(loaded_model, model_dir: Path) -> None:
    app = create_app(Settings(model_dir=model_dir, retry_after_s=7, max_queue_size=17), model=loaded_model)
    calls = [("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/classify"), ("GET", "/v2/health/ready")]
    live, ready, classify, v2_ready, metrics = request_all(app, [*calls, ("GET", "/metrics")])
    # What the alerting rules read: not ready, and the bound the queue refuses work at.
    assert "\nride_ready 0.0\n" in metrics.text and "\nride_queue_capacity 17.0\n" in metrics.text
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    for response in (ready, classify, v2_ready):
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
    request_id = classify.headers["x-request-id"]
    message = "the model is still warming up"
    assert classify.json() == {"error": {"code": "not_ready", "message": message, "request_id": request_id}}
    assert v2_ready.json() == {"error": message}  # the Open Inference Protocol's error body


def test_each_app_has_its_own_registry(loaded_model, model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir)
    first, second = create_app(settings, model=loaded_model), create_app(settings, model=loaded_model)
    request_all(first, [("GET", "/healthz")] * 3)
    (metrics,) = request_all(second, [("GET", "/metrics")])
    assert metrics.status_code == 200
    assert 'ride_requests_total{route="/healthz",status="200"} 0.0' in metrics.text
    model = loaded_model.manifest.model
    info = f'ride_model_info{{name="{model.name}",provider="CPUExecutionProvider",version="{model.version}"}} 1.0'
    assert info in metrics.text


def test_openapi_documents_both_upload_forms(loaded_model, model_dir: Path) -> None:
    app = create_app(Settings(model_dir=model_dir), model=loaded_model)
    (response,) = request_all(app, [("GET", "/openapi.json")])
    classify = response.json()["paths"]["/classify"]["post"]
    assert set(classify["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(classify["responses"])
    expected = {"top_k", "threshold", "target_compute", "max_experts", "model", "version"}
    assert {p["name"] for p in classify["parameters"]} == expected


def test_a_classification_never_waits_for_the_thread_pool(loaded_model, model_dir: Path, test_images) -> None:
    """Starlette's thread pool (where FastAPI runs plain-function dependencies) is held by another task: a small
    image must still be classified, with no round trip to another thread on its way (it hung here when the
    state dependency was a plain function)."""
    import threading

    import anyio

    app = create_app(Settings(model_dir=model_dir), model=loaded_model)
    state = app.state.service
    body = test_images[0][1]

    async def scenario() -> httpx.Response:
        await state.start()
        await state.warm_up()
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        release = threading.Event()
        holder = asyncio.ensure_future(anyio.to_thread.run_sync(release.wait))
        await asyncio.sleep(0.05)  # the holder has taken the pool's only token
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                request = client.post("/classify", content=body, headers={"content-type": "image/jpeg"})
                return await asyncio.wait_for(request, 60)
        finally:
            release.set()
            await holder
            await state.stop()

    response = asyncio.run(scenario())
    assert response.status_code == 200 and 1 <= response.json()["experts_used"] <= 3
