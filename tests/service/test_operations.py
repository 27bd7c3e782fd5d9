"""What operators rely on: request ids and trace context in replies and log lines (a real server), the optional
bearer token and CORS, process and GC metrics, and an OpenAPI document that tells the truth (in-process)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.metrics import EXPOSITION_CONTENT_TYPE
from service.request_context import parse_traceparent
from service.settings import Settings
from tests.server_process import start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_traceparent_parsing() -> None:
    assert parse_traceparent(TRACEPARENT) == (TRACE_ID, "00f067aa0ba902b7")
    for invalid in (None, "", "garbage", f"ff-{TRACE_ID}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        assert parse_traceparent(invalid) is None


def test_request_ids_and_trace_context_reach_replies_and_log_lines(
    model_dir: Path, tmp_path: Path, test_images
) -> None:
    server = start_server(model_dir, tmp_path / "server.log", RIDE_ACCESS_LOG="true")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            given = client.post(
                "/classify",
                content=test_images[0][1],
                headers={"content-type": "image/jpeg", "X-Request-ID": "order-7", "traceparent": TRACEPARENT},
            )
            generated = client.get("/readyz")
            bad = client.post("/classify", content=b"nope", headers={"content-type": "image/png"})
            unsafe = client.get("/healthz", headers={"X-Request-ID": "has space " + "x" * 200})
    finally:
        server.stop()
    assert given.status_code == 200 and given.headers["x-request-id"] == "order-7"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert bad.json()["error"]["request_id"] == bad.headers["x-request-id"]
    assert unsafe.headers["x-request-id"] != "has space " + "x" * 200  # replaced, never echoed into a header
    log = server.log()
    (line,) = [line for line in log.splitlines() if "POST /classify" in line and "order-7" in line]
    assert f"trace_id={TRACE_ID}" in line
    assert f"request_id={bad.headers['x-request-id']}" in log


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # no lifespan: never warm
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(scenario())


@pytest.fixture(scope="module")
def guarded_app(loaded_model, model_dir: Path):
    settings = Settings(model_dir=model_dir, api_key="s3cret", cors_origins="https://ui.example")
    return create_app(settings, model=loaded_model)


def test_token_guards_inference_routes_only(guarded_app) -> None:
    name = guarded_app.state.service.default_model().name
    image = {"content": b"x", "headers": {"content-type": "image/png"}}
    for path in ("/classify", f"/v1/models/{name}:predict", f"/v2/models/{name}/infer"):
        refused = request(guarded_app, "POST", path, **image)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = request(guarded_app, "POST", path, content=b"x", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        # The right token gets past the guard: the model is not warm here, hence 503.
        allowed = request(guarded_app, "POST", path, content=b"x", headers={"authorization": "Bearer s3cret"})
        assert allowed.status_code == 503, path
    assert set(request(guarded_app, "POST", f"/v2/models/{name}/infer", **image).json()) == {"error"}
    for path in ("/healthz", "/metrics", "/v2/health/live", "/v2", f"/v2/models/{name}", "/v1/models", "/models"):
        assert request(guarded_app, "GET", path).status_code == 200, path


def test_cors_only_when_configured(guarded_app, loaded_model, model_dir: Path) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    answered = request(guarded_app, "OPTIONS", "/classify", headers=preflight)
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == "https://ui.example"
    other = request(guarded_app, "GET", "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = create_app(Settings(model_dir=model_dir), model=loaded_model)
    assert "access-control-allow-origin" not in request(plain, "GET", "/healthz", headers=preflight).headers


def test_process_and_gc_collectors_in_the_apps_registry(loaded_model, model_dir: Path) -> None:
    text = request(create_app(Settings(model_dir=model_dir), model=loaded_model), "GET", "/metrics").text
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_objects_collected_total"):
        assert f"\n{family}" in text, family
    assert "python_info{" in text


def test_openapi_tells_the_truth(loaded_model, model_dir: Path) -> None:
    document = request(create_app(Settings(model_dir=model_dir), model=loaded_model), "GET", "/openapi.json").json()
    paths = document["paths"]
    metrics = paths["/metrics"]["get"]["responses"]
    assert set(metrics) == {"200"} and set(metrics["200"]["content"]) == {EXPOSITION_CONTENT_TYPE}
    assert EXPOSITION_CONTENT_TYPE.startswith("text/plain")
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v1/models/{name}", "/v2/models/{name}/infer"):
        (operation,) = paths[path].values()
        assert "422" not in operation["responses"], path
    assert set(paths["/v2/health/live"]["get"]["responses"]) == {"200"}
    assert set(paths["/models"]["get"]["responses"]) == {"200"}
    assert set(paths["/healthz"]["get"]["responses"]) == {"200", "503"}
    classify = paths["/classify"]["post"]
    assert {"200", "400", "401", "404", "413", "415", "422", "503"} == set(classify["responses"])
    assert classify["responses"]["200"]["content"]["application/json"]["examples"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["example"]["inputs"][0]["name"] == "image"
    assert "$ref" not in str(infer["requestBody"])
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2ErrorBody")
    predict = paths["/v1/models/{name}:predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["example"]["instances"]
    assert "/v2/models/{name}/versions/{version}/infer" in paths
    schemas = document["components"]["schemas"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            text = json.dumps(operation)
            referenced = [json.dumps(schemas[name]) for name in re.findall(r"#/components/schemas/(\w+)", text)]
            assert any('"example' in part for part in [text, *referenced]), f"{method.upper()} {path}: no example"
