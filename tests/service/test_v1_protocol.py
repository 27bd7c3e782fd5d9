"""KServe v1 against the real shared server: model list, readiness, predict with base64 instances, and its bad
inputs."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from export.manifest import load_manifest
from tests.server_process import ServerProcess
from tests.service.test_server import post_image


@pytest.fixture
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http


@pytest.fixture(scope="module")
def name(model_dir: Path) -> str:
    return load_manifest(model_dir).model.name


def instances(images: list[bytes]) -> dict:
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}} for data in images]}


def test_models_and_readiness(client: httpx.Client, name: str) -> None:
    assert client.get("/v1/models").json() == {"models": [name]}
    assert client.get(f"/v1/models/{name}").json() == {"name": name, "ready": True}
    missing = client.get("/v1/models/resnet50")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_predict_answers_each_instance_as_classify_does(client: httpx.Client, name: str, test_images) -> None:
    images = [data for _, data in test_images[:4]]
    response = client.post(f"/v1/models/{name}:predict", json=instances(images), params={"top_k": 3, "threshold": 0.3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 4
    for prediction, data in zip(predictions, images, strict=True):
        alone = post_image(client, data, top_k=3, threshold=0.3).json()
        assert [c["class_id"] for c in prediction["top_k"]] == [c["class_id"] for c in alone["top_k"]]
        assert [c["probability"] for c in prediction["top_k"]] == pytest.approx(
            [c["probability"] for c in alone["top_k"]], abs=1e-5
        )
        assert (prediction["label"], prediction["experts_used"]) == (alone["label"], alone["experts_used"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"inputs": []}', 400, "instances"),
        (b'{"instances": [{"image_bytes": "abc"}]}', 400, "row 0"),
        (b'{"instances": [{"image_bytes": {"b64": "QUJD"}}, {"image_bytes": {"b64": "%%%"}}]}', 400, "row 1"),
        (b'{"instances": [{"image_bytes": {"b64": "aGVsbG8="}}]}', 400, "row 0: not an image"),
        (b'{"instances": []}', 400, "no image"),
    ],
)
def test_bad_predict_requests(client: httpx.Client, name: str, body: bytes, status: int, needle: str) -> None:
    response = client.post(f"/v1/models/{name}:predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert client.get(f"/v1/models/{name}").json()["ready"] is True


def test_predict_row_limit_and_unknown_model(client: httpx.Client, name: str, test_images) -> None:
    too_many = client.post(f"/v1/models/{name}:predict", json=instances([test_images[0][1]] * 65))
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_rows"
    assert "65 rows" in too_many.json()["error"]["message"]
    unknown = client.post("/v1/models/resnet50:predict", json=instances([test_images[0][1]]))
    assert unknown.status_code == 404
