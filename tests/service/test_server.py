"""End to end against real `python -m service` processes on 127.0.0.1, with real CIFAR-10 test images."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cascade import run_cascade
from export.manifest import expert_file, load_manifest
from service.images import ImageDecoder
from tests.server_process import REPO_ROOT, ServerProcess, spawn_server, start_server
from tests.service.conftest import NUM_EXPERTS, png_header
from tests.service.test_images import sixteen_bit_png

Samples = dict[tuple[str, frozenset], float]


def metrics(server: ServerProcess) -> Samples:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of ``metric`` over every series that has ``labels`` (and any others, e.g. ``group``)."""
    wanted = set(labels.items())
    return sum(v for (name, have), v in samples.items() if name == metric and wanted <= have)


def post_image(client: httpx.Client, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return client.post("/classify", content=data, headers={"content-type": content_type}, params=params)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http


def expected_rows(model, model_dir: Path, images: list[bytes], **cascade):
    decoder = ImageDecoder(load_manifest(model_dir).input, max_pixels=10**6)
    return run_cascade(model, np.stack([decoder.decode(data) for data in images]), **cascade)


def probabilities(body: dict) -> np.ndarray:
    scores = np.zeros(len(body["top_k"]))
    for entry in body["top_k"]:
        scores[entry["class_id"]] = entry["probability"]
    return scores


def test_classify_end_to_end(client: httpx.Client, test_images, loaded_model, model_dir: Path) -> None:
    _, data = test_images[0]
    raw = post_image(client, data, top_k=3)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) == {
        "model", "label", "class_id", "probability", "top_k", "experts_used", "num_experts", "relative_compute",
        "timing_ms",
    }  # fmt: skip
    model = load_manifest(model_dir).model
    assert body["model"] == {"name": model.name, "version": model.version}
    assert len(body["top_k"]) == 3 and body["top_k"][0]["label"] == body["label"]
    assert body["num_experts"] == NUM_EXPERTS and 1 <= body["experts_used"] <= NUM_EXPERTS
    assert 0 < body["relative_compute"] <= 1
    assert raw.headers["x-experts-used"] == str(body["experts_used"])
    assert raw.headers["server-timing"].startswith("queue;dur=")
    timing = body["timing_ms"]
    assert 0 <= timing["queue"] <= timing["total"] and 0 < timing["inference"] <= timing["total"]

    expected = expected_rows(loaded_model, model_dir, [data], thresholds=0.5, max_experts=NUM_EXPERTS)
    assert body["experts_used"] == expected.experts_used[0]
    assert body["class_id"] == int(expected.probabilities[0].argmax())
    assert body["probability"] == pytest.approx(float(expected.probabilities[0].max()), abs=1e-5)

    multipart = client.post("/classify", files={"file": ("cat.jpg", data, "image/jpeg")}, params={"top_k": 3})
    assert multipart.status_code == 200
    assert multipart.json()["top_k"] == body["top_k"]


def test_64_concurrent_requests_are_batched_and_match_alone(
    server: ServerProcess, client: httpx.Client, test_images, loaded_model, model_dir: Path
) -> None:
    images = [data for _, data in test_images[:64]]
    alone = [post_image(client, data, top_k=10).json() for data in images]
    before = metrics(server)

    async def concurrently() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits) as http:
            headers = {"content-type": "image/jpeg"}
            return await asyncio.gather(
                *(http.post("/classify", content=data, headers=headers, params={"top_k": 10}) for data in images)
            )

    batched = asyncio.run(concurrently())
    after = metrics(server)
    assert [r.status_code for r in batched] == [200] * 64
    batches = value(after, "ride_batch_size_count") - value(before, "ride_batch_size_count")
    singles = value(after, "ride_batch_size_bucket", le="1.0") - value(before, "ride_batch_size_bucket", le="1.0")
    assert batches - singles >= 1, "no batch larger than one row"
    assert value(after, "ride_batch_size_sum") - value(before, "ride_batch_size_sum") == 64

    expected = expected_rows(loaded_model, model_dir, images, thresholds=0.5, max_experts=NUM_EXPERTS)
    for i, response in enumerate(batched):
        body = response.json()
        assert body["experts_used"] == alone[i]["experts_used"] == expected.experts_used[i]
        np.testing.assert_allclose(probabilities(body), probabilities(alone[i]), atol=1e-5)
        np.testing.assert_allclose(probabilities(body), expected.probabilities[i], atol=1e-5)
    assert len({r.json()["experts_used"] for r in batched}) > 1  # the routers really sent rows different ways


def test_threshold_and_max_experts_overrides(client: httpx.Client, test_images) -> None:
    for _, data in test_images[:8]:
        everything = post_image(client, data, threshold=0.0).json()
        assert everything["experts_used"] == NUM_EXPERTS and everything["relative_compute"] == pytest.approx(1.0)
        assert post_image(client, data, max_experts=1, threshold=0.0).json()["experts_used"] == 1
        assert post_image(client, data, threshold=1.0).json()["experts_used"] == 1


LIMIT = 512 * 1024  # the shared server's RIDE_MAX_BODY_BYTES


def truncated_jpeg(test_images) -> bytes:
    data = test_images[1][1]
    return data[: int(len(data) * 0.8)]


BAD_REQUESTS = [
    # id, body or factory, content type, params, status, code
    ("truncated-jpeg", truncated_jpeg, "image/jpeg", {}, 400, "invalid_image"),
    ("not-an-image", b"hello, this is text", "image/png", {}, 400, "invalid_image"),
    ("zero-bytes", b"", "image/jpeg", {}, 400, "invalid_image"),
    ("above-body-limit", b"\0" * (LIMIT + 1), "image/png", {}, 413, "payload_too_large"),
    ("decompression-bomb", png_header(100_000, 100_000), "image/png", {}, 413, "image_too_large"),
    ("above-pixel-limit", png_header(5001, 5000), "image/png", {}, 413, "image_too_large"),
    # 60 KB that decoded to +565 MB: above the default limit fitted to the 32x32 model (2 MiP), refused unread.
    (
        "sixteen-bit-png-of-25-megapixels",
        lambda _: sixteen_bit_png(5000, 5000),
        "image/png",
        {},
        413,
        "image_too_large",
    ),
    ("text-content-type", b"hello", "text/plain", {}, 415, "unsupported_media_type"),
    ("json-content-type", b"{}", "application/json", {}, 415, "unsupported_media_type"),
    ("no-content-type", b"abc", "", {}, 415, "unsupported_media_type"),
    ("threshold-above-1", None, "image/jpeg", {"threshold": 1.5}, 422, "invalid_parameter"),
    ("threshold-not-a-number", None, "image/jpeg", {"threshold": "high"}, 422, "invalid_parameter"),
    ("max-experts-0", None, "image/jpeg", {"max_experts": 0}, 422, "invalid_parameter"),
    ("max-experts-above-E", None, "image/jpeg", {"max_experts": NUM_EXPERTS + 1}, 422, "invalid_parameter"),
    ("top-k-0", None, "image/jpeg", {"top_k": 0}, 422, "invalid_parameter"),
    ("unknown-parameter", None, "image/jpeg", {"treshold": 0.5}, 422, "invalid_parameter"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "params", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(
    client: httpx.Client, test_images, body, content_type: str, params: dict, status: int, code: str
) -> None:
    if body is None:
        body = test_images[0][1]
    elif callable(body):
        body = body(test_images)
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/classify", content=body, headers=headers, params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert client.get("/healthz").status_code == 200
    assert post_image(client, test_images[0][1]).status_code == 200


def test_bad_multipart_uploads(client: httpx.Client, test_images) -> None:
    data = test_images[0][1]
    not_image = client.post("/classify", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert not_image.status_code == 415 and not_image.json()["error"]["code"] == "unsupported_media_type"
    wrong_field = client.post("/classify", files={"image": ("x.jpg", data, "image/jpeg")})
    assert wrong_field.status_code == 422 and wrong_field.json()["error"]["code"] == "invalid_parameter"
    too_big = client.post("/classify", files={"file": ("x.png", b"\0" * (LIMIT + 1), "image/png")})
    assert too_big.status_code == 413
    untyped = client.post("/classify", files={"file": ("x.jpg", data, "application/octet-stream")})
    assert untyped.status_code == 200


def test_other_routes_errors_have_the_same_shape(client: httpx.Client) -> None:
    unknown = client.get("/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = client.get("/classify")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    unknown_model = client.get("/v1/models/resnet50")
    assert unknown_model.status_code == 404 and unknown_model.json()["error"]["code"] == "model_not_found"


def test_every_image_mode_is_served(client: httpx.Client) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    uploads = {
        "rgba.png": (encode(Image.new("RGBA", (32, 32), (1, 2, 3, 100)), "PNG"), "image/png"),
        "gray16.png": (encode(Image.new("I;16", (48, 48), 40000), "PNG"), "image/png"),
        "cmyk.jpg": (encode(Image.new("CMYK", (32, 32), (10, 200, 30, 5)), "JPEG"), "image/jpeg"),
        "palette.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif"),
        "rotated.jpg": (encode(Image.new("RGB", (64, 32), (9, 9, 200)), "JPEG", exif=exif), "image/jpeg"),
        "large.png": (encode(Image.new("RGB", (640, 480), (50, 100, 150)), "PNG"), "image/png"),
        "bilevel.tiff": (encode(Image.new("1", (32, 32), 1), "TIFF"), "image/tiff"),
    }
    for name, (data, content_type) in uploads.items():
        response = post_image(client, data, content_type)
        assert response.status_code == 200, (name, response.text)


def test_health_and_model_metadata(client: httpx.Client, model_dir: Path) -> None:
    name = load_manifest(model_dir).model.name
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{name}/ready").json() == {"ready": True}
    (summary,) = client.get("/models").json()["models"]
    assert summary["provider"] == "CPUExecutionProvider"
    assert (summary["precision"], summary["quantization"]) == ("float32", None)
    assert (summary["num_experts"], summary["has_routers"], summary["default_threshold"]) == (NUM_EXPERTS, True, 0.5)
    cost = summary["cost"]
    assert cost["full_ensemble_macs"] == cost["trunk_macs"] + sum(cost["expert_macs"]) + sum(cost["router_macs"])
    v2 = client.get(f"/v2/models/{name}").json()
    assert v2["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
    ]
    assert v2["parameters"] == {"precision": "float32"}
    assert client.get("/docs").status_code == 200


def test_metrics_add_up(server: ServerProcess, client: httpx.Client, test_images, model_dir: Path) -> None:
    before = metrics(server)
    answers = [
        post_image(client, data, threshold=t).json()
        for (_, data), t in zip(test_images[:6], (0.0, 0.5, 1.0) * 2, strict=True)
    ]
    post_image(client, b"garbage", "image/png")
    post_image(client, b"garbage", "text/plain")
    post_image(client, test_images[0][1], max_experts=99)
    after = metrics(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def delta_total(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    successes = len(answers)
    assert delta("ride_requests_total", route="/classify", status="200") == successes
    for status in ("400", "415", "422"):
        assert delta("ride_requests_total", route="/classify", status=status) == 1
    assert delta("ride_request_duration_seconds_count", route="/classify") == successes + 3
    for name in ("ride_experts_used_count", "ride_queue_wait_seconds_count", "ride_relative_compute_count"):
        assert delta_total(name) == successes, name
    assert delta_total("ride_experts_used_sum") == sum(a["experts_used"] for a in answers)
    assert sum(delta_total("ride_exits_total", expert=str(k)) for k in range(1, NUM_EXPERTS + 1)) == successes
    # The group label is the answer's class group (from the manifest).
    groups = {c.name: c.group for c in load_manifest(model_dir).classes}
    for group in set(groups.values()):
        answered = sum(1 for a in answers if groups[a["label"]] == group)
        assert delta("ride_experts_used_count", group=group) == answered, group
    assert delta("ride_relative_compute_sum") == pytest.approx(sum(a["relative_compute"] for a in answers))
    assert delta("ride_inference_duration_seconds_count") == delta("ride_batch_size_count") >= 1
    model = load_manifest(model_dir).model
    info = {"name": model.name, "version": model.version, "provider": "CPUExecutionProvider"}
    assert value(after, "ride_model_info", **info) == 1
    assert value(after, "ride_queue_depth") == 0
    assert value(after, "ride_ready") == 1 and value(after, "ride_queue_capacity") == 256
    buckets = {dict(labels)["le"] for name, labels in after if name == "ride_experts_used_bucket"}
    assert buckets == {"1.0", "2.0", "3.0", "+Inf"}
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")


def test_tampered_graph_refuses_to_start(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(model_dir, folder)
    graph = folder / expert_file(2)
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    process, _ = spawn_server(folder, tmp_path / "server.log")
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log = (tmp_path / "server.log").read_text()
    assert returncode == 1
    assert "Traceback" not in log
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert "expert_2.onnx has sha256" in line and "re-export" in line


def test_a_folder_other_than_the_pinned_one_refuses_to_start(model_dir: Path, tmp_path: Path) -> None:
    process, _ = spawn_server(model_dir, tmp_path / "server.log", RIDE_MODEL_SHA256="0" * 64)
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log = (tmp_path / "server.log").read_text()
    assert returncode == 1 and "Traceback" not in log
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert "is pinned (RIDE_MODEL_SHA256)" in line


def test_full_queue_then_sigterm_answers_every_request_in_flight(model_dir: Path, tmp_path: Path, test_images) -> None:
    # Batches wait 3 s for company, lone requests too, so requests are still in flight when the signal arrives.
    in_flight = 16
    server = start_server(
        model_dir,
        tmp_path / "server.log",
        RIDE_MAX_WAIT_MS="3000",
        RIDE_WAIT_WHEN_IDLE="true",
        RIDE_MAX_QUEUE_WAIT_MS="10000",
        RIDE_MAX_BATCH_SIZE="64",
        RIDE_MAX_QUEUE_SIZE=str(in_flight),
    )
    try:
        images = [data for _, data in test_images[:in_flight]]
        with ThreadPoolExecutor(in_flight) as pool, httpx.Client(base_url=server.url, timeout=30.0) as client:
            futures = [pool.submit(post_image, client, data) for data in images]
            deadline = time.monotonic() + 10
            while value(metrics(server), "ride_queue_depth") < in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            assert value(metrics(server), "ride_queue_depth") == in_flight
            overflow = post_image(client, images[0])
            assert overflow.status_code == 503 and overflow.headers["retry-after"] == "1"
            assert overflow.json()["error"]["code"] == "overloaded"

            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no longer accepting
                httpx.get(f"{server.url}/healthz", timeout=2.0)
            responses = [future.result(timeout=30) for future in futures]
        assert [r.status_code for r in responses] == [200] * in_flight
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_port_in_use_exits_1_with_one_error_line(model_dir: Path, tmp_path: Path) -> None:
    """The documented exit status for "the server cannot start" is 1 (uvicorn itself exits 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_an_oversized_body_gets_a_413_the_client_can_read(server: ServerProcess) -> None:
    """Clients that send their whole body before reading (httpx, urllib) got a connection reset instead of the 413:
    the server closed with the body unread. It now reads and drops the body (up to 4x the limit) first."""
    body = b"\0" * (3 * LIMIT)

    async def with_httpx() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
            declared = [
                await http.post("/classify", content=body, headers={"content-type": "image/png"}) for _ in range(5)
            ]

            async def chunks():
                for start in range(0, len(body), 65536):
                    yield body[start : start + 65536]

            streamed = await http.post("/classify", content=chunks(), headers={"content-type": "image/png"})
        for response in [*declared, streamed]:
            assert response.json()["error"]["code"] == "payload_too_large"
        return [r.status_code for r in [*declared, streamed]]

    assert asyncio.run(with_httpx()) == [413] * 6
    for _ in range(3):
        request = urllib.request.Request(f"{server.url}/classify", data=body, headers={"Content-Type": "image/png"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"]["code"] == "payload_too_large"


def test_an_oversized_body_announced_with_expect_100_continue_is_refused_unsent(server: ServerProcess) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {100 * LIMIT}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        reply = sock.recv(65536)  # no body was sent: the answer comes at once, and no 100 Continue
    assert reply.startswith(b"HTTP/1.1 413"), reply


# Runs a command with the whole root file system read-only, in a private mount namespace (needs root).
READ_ONLY_ROOT = ("unshare", "--mount", "sh", "-c", 'mount --bind / / && mount -o remount,bind,ro / && exec "$@"', "sh")


def test_a_multipart_upload_never_touches_the_disk(model_dir: Path, tmp_path: Path) -> None:
    """Starlette spooled file parts above 1 MiB to a temporary file: with no writable directory (a hardened
    container), a 2 MB upload got a 500."""
    probe = subprocess.run([*READ_ONLY_ROOT, "sh", "-c", "! touch /tmp/ride-probe"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only root here (needs root and unshare): {probe.stderr.decode()[:200]}")
    noise = np.random.default_rng(0).integers(0, 256, (720, 960, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert len(data) > 2_000_000  # the 2 MB, above Starlette's 1 MiB spool
    server = start_server(model_dir, tmp_path / "server.log", prefix=READ_ONLY_ROOT)
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            response = client.post("/classify", files={"file": ("noise.png", data, "image/png")})
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_parameter_mistakes_get_short_precise_422s(client: httpx.Client, test_images) -> None:
    data = test_images[0][1]
    not_a_number = post_image(client, data, threshold="nan")
    assert not_a_number.status_code == 422 and "finite number" in not_a_number.json()["error"]["message"]
    repeated = client.post(
        "/classify?threshold=0.1&threshold=0.9", content=data, headers={"content-type": "image/jpeg"}
    )
    assert repeated.status_code == 422
    assert repeated.json()["error"]["message"] == "query parameters given more than once: threshold"
    unknown = "&".join(f"p{i}=1" for i in range(1000))
    many = client.post(f"/classify?{unknown}", content=data, headers={"content-type": "image/jpeg"})
    assert many.status_code == 422 and len(many.content) < 1000, len(many.content)  # was 38 kB
    assert many.json()["error"]["message"].endswith("and 995 more problems")


def test_the_docs_routes_are_counted_as_themselves(server: ServerProcess, client: httpx.Client) -> None:
    before = metrics(server)
    docs = client.get("/docs")
    asset = next(url for url in re.findall(r"""(?:src|href)=["']([^"']+)""", docs.text) if url.startswith("/static"))
    for path in ("/openapi.json", "/redoc", asset):
        assert client.get(path).status_code == 200, path
    after = metrics(server)
    mount = "/" + asset.split("/")[1]
    for route in ("/docs", "/openapi.json", "/redoc", mount):
        assert value(after, "ride_requests_total", route=route, status="200") == (
            value(before, "ride_requests_total", route=route, status="200") + 1
        ), route
    assert value(after, "ride_requests_total", route="unmatched", status="200") == 0
