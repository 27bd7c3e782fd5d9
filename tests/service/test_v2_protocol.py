"""Open Inference Protocol v2 against a real server: every route through the real `tritonclient.http` (what Triton
and KServe users bring), the bad inputs through raw HTTP, and answers checked against the cascade run in-process."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.manifest import load_manifest
from service.images import ImageDecoder
from tests.server_process import ServerProcess
from tests.service.conftest import NUM_EXPERTS
from tests.service.test_server import expected_rows

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def triton(server: ServerProcess):
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)
    yield client
    client.close()


@pytest.fixture
def raw(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def model(model_dir: Path):
    return load_manifest(model_dir).model


def image_input(images: list[bytes], *, binary: bool = True):
    tensor = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(data) for data in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def pixel_input(pixels: np.ndarray, *, binary: bool = True):
    tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def output(name: str, **options):
    return tritonclient_http.InferRequestedOutput(name, **options)


def test_server_and_model_metadata(triton, model, model_dir: Path) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(model.name) and triton.is_model_ready(model.name, model.version)
    server = triton.get_server_metadata()
    assert server["name"] == "ride-serve" and server["version"]
    assert set(server["extensions"]) == {"classification", "binary_tensor_data"}
    metadata = triton.get_model_metadata(model.name)
    assert triton.get_model_metadata(model.name, model.version) == metadata
    assert metadata["name"] == model.name and metadata["versions"] == [model.version]
    spec = load_manifest(model_dir).input
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, spec.height, spec.width]},
    ]
    classes = len(load_manifest(model_dir).classes)
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "experts_used", "datatype": "INT32", "shape": [-1]},
        {"name": "relative_compute", "datatype": "FP32", "shape": [-1]},
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda t, m: t.get_model_metadata("resnet50"),
        lambda t, m: t.get_model_metadata(m.name, "no-such-version"),
        lambda t, m: t.is_model_ready("resnet50") or t.get_model_metadata("resnet50"),
        lambda t, m: t.infer("resnet50", [image_input([b"x"])]),
        lambda t, m: t.infer(m.name, [image_input([b"x"])], model_version="no-such-version"),
    ],
)
def test_unknown_model_or_version_is_a_404_the_client_reads(triton, model, call) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(triton, model)
    assert caught.value.status() == "404"
    assert "resnet50" in caught.value.message() or "no-such-version" in caught.value.message()


def test_infer_images_binary_both_ways_matches_the_cascade(triton, model, test_images, loaded_model, model_dir) -> None:
    images = [data for _, data in test_images[:5]]
    result = triton.infer(model.name, [image_input(images)], request_id="req-1")  # no outputs named: all, binary
    response = result.get_response()
    assert response["model_name"] == model.name and response["model_version"] == model.version
    assert response["id"] == "req-1"
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "label", "experts_used", "relative_compute"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    expected = expected_rows(loaded_model, model_dir, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected.probabilities, atol=1e-5)
    assert result.as_numpy("experts_used").tolist() == expected.experts_used.tolist()
    labels = [c.name for c in load_manifest(model_dir).classes]
    assert [v.decode() for v in result.as_numpy("label")] == [labels[i] for i in expected.probabilities.argmax(1)]
    np.testing.assert_allclose(result.as_numpy("relative_compute"), expected.relative_compute, atol=1e-6)


def test_infer_json_base64_with_selected_outputs_and_versioned_path(
    triton, model, test_images, loaded_model, model_dir
):
    images = [data for _, data in test_images[:3]]
    outputs = [output("experts_used", binary_data=False), output("label", binary_data=False)]
    result = triton.infer(model.name, [image_input(images, binary=False)], outputs=outputs, model_version=model.version)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["experts_used", "label"]
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    expected = expected_rows(loaded_model, model_dir, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    assert response["outputs"][0]["data"] == expected.experts_used.tolist()


def test_per_request_threshold_and_max_experts(triton, model, test_images, loaded_model, model_dir) -> None:
    images = [data for _, data in test_images[10:16]]
    for parameters, cascade in (
        ({"threshold": 0.0}, {"thresholds": 0.0, "max_experts": NUM_EXPERTS}),
        ({"threshold": 0.9}, {"thresholds": 0.9, "max_experts": NUM_EXPERTS}),
        ({"max_experts": 1}, {"thresholds": 0.5, "max_experts": 1}),
    ):
        result = triton.infer(
            model.name, [image_input(images)], outputs=[output("experts_used")], parameters=parameters
        )
        expected = expected_rows(loaded_model, model_dir, images, **cascade)
        assert result.as_numpy("experts_used").tolist() == expected.experts_used.tolist(), parameters


def test_classification_extension(triton, model, test_images, loaded_model, model_dir) -> None:
    images = [data for _, data in test_images[:2]]
    expected = expected_rows(loaded_model, model_dir, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    labels = [c.name for c in load_manifest(model_dir).classes]
    as_output = triton.infer(model.name, [image_input(images)], outputs=[output("probabilities", class_count=3)])
    by_parameter = triton.infer(
        model.name,
        [image_input(images)],
        outputs=[output("probabilities", binary_data=False)],
        parameters={"classification": 3},
    )
    for result in (as_output, by_parameter):
        (meta,) = result.get_response()["outputs"]
        assert meta["datatype"] == "BYTES" and meta["shape"] == [2, 3]
        rows = result.as_numpy("probabilities")
        assert rows.shape == (2, 3)
        for row, probabilities in zip(rows, expected.probabilities, strict=True):
            entries = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in row]
            top = np.argsort(-probabilities, kind="stable")[:3]
            assert [int(index) for _, index, _ in entries] == top.tolist()
            assert [label for _, _, label in entries] == [labels[i] for i in top]
            assert [float(score) for score, _, _ in entries] == pytest.approx(probabilities[top].tolist(), abs=1e-5)


def test_pixels_input_json_and_binary_gives_what_the_image_gives(triton, model, test_images, model_dir) -> None:
    images = [data for _, data in test_images[20:24]]
    decoder = ImageDecoder(load_manifest(model_dir).input, max_pixels=10**6)
    pixels = np.stack([decoder.decode(data) for data in images]).astype(np.float32)
    by_image = triton.infer(model.name, [image_input(images)]).as_numpy("probabilities")
    for binary in (True, False):
        result = triton.infer(model.name, [pixel_input(pixels, binary=binary)], outputs=[output("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), by_image, atol=1e-6)


def test_gzip_request_body(triton, model, test_images) -> None:
    images = [data for _, data in test_images[:2]]
    plain = triton.infer(model.name, [image_input(images)], outputs=[output("label")])
    packed = triton.infer(
        model.name, [image_input(images)], outputs=[output("label")], request_compression_algorithm="gzip"
    )
    assert packed.as_numpy("label").tolist() == plain.as_numpy("label").tolist()


def test_bad_requests_raise_in_the_client_with_the_message(triton, model, test_images) -> None:
    jpeg = test_images[0][1]
    wrong_type = tritonclient_http.InferInput("image", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    unknown_input = tritonclient_http.InferInput("photo", [1], "BYTES")
    unknown_input.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    cases = {
        "datatype FP32, expected BYTES": dict(inputs=[wrong_type]),
        "unknown input 'photo'": dict(inputs=[unknown_input]),
        "unknown output 'logits'": dict(inputs=[image_input([jpeg])], outputs=[output("logits")]),
        "row 1: not an image": dict(inputs=[image_input([jpeg, b"definitely not an image"])]),
        "not valid base64": dict(inputs=[image_input([jpeg])], parameters={}, binary=False),
        "parameters": dict(inputs=[image_input([jpeg])], parameters={"threshold": 2}),
        "max_experts": dict(inputs=[image_input([jpeg])], parameters={"max_experts": 99}),
        "classification applies to output 'probabilities'": dict(
            inputs=[image_input([jpeg])], outputs=[output("label", class_count=2)]
        ),
    }
    for expected, call in cases.items():
        if call.pop("binary", True) is False:
            tensor = tritonclient_http.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array(["%%% not base64 %%%"], dtype=np.object_), binary_data=False)
            call["inputs"] = [tensor]
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(model.name, **call)
        assert caught.value.status() == "400", (expected, caught.value)
        assert expected in caught.value.message(), caught.value.message()
    assert triton.infer(model.name, [image_input([jpeg])]).as_numpy("label").shape == (1,)


def test_too_many_rows_is_a_413(triton, model, test_images) -> None:
    images = [data for _, data in test_images[:1]] * 65
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model.name, [image_input(images)])
    assert caught.value.status() == "413"
    assert "65 rows" in caught.value.message() and "limit of 64" in caught.value.message()


def post_infer(raw: httpx.Client, name: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return raw.post(f"/v2/models/{name}/infer", content=content, headers=headers or {})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_bodies(jpeg: bytes, height: int) -> dict[str, tuple[dict | bytes, dict]]:
    """Each bad request: (body, extra headers)."""
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(jpeg)]}
    pixels = {"name": "pixels", "shape": [1, 3, height, height], "datatype": "FP32"}
    zero_pixels = [0.0] * (3 * height * height)
    head = json.dumps({"inputs": [{**image, "data": None, "parameters": {"binary_data_size": 9999}}]}).encode()
    huge = json.dumps({"inputs": [{**pixels, "data": ["HUGE", *zero_pixels[1:]]}]})
    short = json.dumps({"inputs": [{**image, "data": None, "parameters": {"binary_data_size": 6}}]}).encode()
    return {
        "not JSON": (b"{nope", {}),
        "JSON not an object": (b"[1, 2]", {}),
        "no inputs key": ({"outputs": []}, {}),
        "missing input": ({"inputs": []}, {}),
        "two inputs": ({"inputs": [image, {**pixels, "data": zero_pixels}]}, {}),
        "unknown input": ({"inputs": [{**image, "name": "photo"}]}, {}),
        "wrong datatype": ({"inputs": [{**image, "datatype": "INT8"}]}, {}),
        "wrong image shape": ({"inputs": [{**image, "shape": [1, 2]}]}, {}),
        "shape and data disagree": ({"inputs": [{**image, "shape": [2]}]}, {}),
        "wrong pixel shape": ({"inputs": [{**pixels, "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}, {}),
        "pixel count": ({"inputs": [{**pixels, "data": zero_pixels[:-1]}]}, {}),
        "pixels not numbers": ({"inputs": [{**pixels, "data": ["a"] * len(zero_pixels)}]}, {}),
        "pixels beyond float": (huge.replace('"HUGE"', "1" + "0" * 400).encode(), {}),
        "pixels infinite": ({"inputs": [{**pixels, "data": [1e39, *zero_pixels[1:]]}]}, {}),
        "no data": ({"inputs": [{**image, "data": None}]}, {}),
        "unknown output": ({"inputs": [image], "outputs": [{"name": "logits"}]}, {}),
        "output twice": ({"inputs": [image], "outputs": [{"name": "label"}, {"name": "label"}]}, {}),
        "not an image": ({"inputs": [{**image, "data": [b64(b"hello")]}]}, {}),
        "empty image": ({"inputs": [{**image, "data": [""]}]}, {}),
        "bad base64": ({"inputs": [{**image, "data": ["***"]}]}, {}),
        "base64 not a string": ({"inputs": [{**image, "data": [12]}]}, {}),
        "threshold out of range": ({"inputs": [image], "parameters": {"threshold": -1}}, {}),
        "threshold not a number": ({"inputs": [image], "parameters": {"threshold": "high"}}, {}),
        "classification zero": ({"inputs": [image], "parameters": {"classification": 0}}, {}),
        "header length not a number": ({"inputs": [image]}, {HEADER_LENGTH: "abc"}),
        "header length past the body": ({"inputs": [image]}, {HEADER_LENGTH: "999999"}),
        "binary size past the body": (head, {HEADER_LENGTH: str(len(head))}),
        "bytes left over": (json.dumps({"inputs": [image]}).encode() + b"xx", {HEADER_LENGTH: "0"}),
        "truncated BYTES element": (short + struct.pack("<I", 100) + b"ab", {HEADER_LENGTH: str(len(short))}),
        "unknown content encoding": ({"inputs": [image]}, {"Content-Encoding": "br"}),
        "not gzip": ({"inputs": [image]}, {"Content-Encoding": "gzip"}),
    }


def test_bad_input_gets_a_4xx_with_the_protocol_body_and_the_server_keeps_serving(
    raw: httpx.Client, model, test_images, model_dir: Path
) -> None:
    jpeg = test_images[0][1]
    height = load_manifest(model_dir).input.height
    for case, (body, headers) in bad_bodies(jpeg, height).items():
        response = post_infer(raw, model.name, body, headers)
        expected = 415 if case == "unknown content encoding" else 400
        assert response.status_code == expected, (case, response.status_code, response.text)
        error = response.json()
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], (case, error)
    ok = post_infer(
        raw, model.name, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(jpeg)]}]}
    )
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert [o["name"] for o in ok.json()["outputs"]] == ["probabilities", "label", "experts_used", "relative_compute"]
    assert raw.get("/v2/health/ready").json() == {"ready": True}


def test_binary_output_layout_and_binary_input_over_raw_http(raw: httpx.Client, model, test_images) -> None:
    jpeg = test_images[0][1]
    element = struct.pack("<I", len(jpeg)) + jpeg
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}
            ],
            "outputs": [{"name": "experts_used", "parameters": {"binary_data": True}}, {"name": "label"}],
        }
    ).encode()
    response = post_infer(raw, model.name, head + element, {HEADER_LENGTH: str(len(head))})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:length])
    experts, label = header["outputs"]
    assert experts["parameters"] == {"binary_data_size": 4} and "data" not in experts
    assert label["data"] and "parameters" not in label
    (used,) = struct.unpack("<i", response.content[length:])
    assert 1 <= used <= NUM_EXPERTS


def test_errors_elsewhere_on_v2_have_the_protocol_body(raw: httpx.Client, model) -> None:
    unknown = raw.get(f"/v2/models/{model.name}/nothing-here")
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    wrong_method = raw.get(f"/v2/models/{model.name}/infer")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}
    model_missing = raw.get("/v2/models/resnet50/ready")
    assert model_missing.status_code == 404 and model_missing.json() == {
        "error": f"unknown model 'resnet50': loaded models: {model.name} (versions {model.version})"
    }
    # Elsewhere the richer body stays.
    assert raw.get("/nothing-here").json()["error"]["code"] == "not_found"


def test_gzip_bomb_is_refused_by_the_body_limit(raw: httpx.Client, model) -> None:
    bomb = gzip.compress(b"{" + b" " * (4 * 1024 * 1024) + b"}")
    response = post_infer(raw, model.name, bomb, {"Content-Encoding": "gzip"})
    assert response.status_code == 413 and set(response.json()) == {"error"}
