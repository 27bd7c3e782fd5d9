"""The model repository (RIDE_MODEL_REPOSITORY): <name>/<version>/ folders of the test export, served by a real
server; the Open Inference Protocol's repository extension (index, load, unload) as admin routes; SIGHUP rescans;
reloads under load lose no request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from export.manifest import MANIFEST_NAME, expert_file, load_manifest, write_manifest
from service.api import create_app
from service.errors import ModelLoadError, NotReadyError
from service.loader import choose_default
from service.repository import version_order
from service.settings import Settings
from tests.server_process import ServerProcess, cifar10_test_images, spawn_server, start_server
from tests.service.test_server import metrics, value

TOKEN = "repository-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}
PROVIDER = "CPUExecutionProvider"


def add_version(model_dir: Path, repository: Path, name: str, version: str) -> Path:
    """A copy of the test export as ``repository/name/version`` (copied: a model folder's files may not be
    symlinks that lead out of it)."""
    return Path(shutil.copytree(model_dir, repository / name / version))


def add_broken_graph(model_dir: Path, repository: Path, name: str, version: str) -> Path:
    """A version whose second expert's graph was changed after export: its sha256 no longer matches."""
    folder = add_version(model_dir, repository, name, version)
    graph = folder / expert_file(2)
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    return folder


def add_broken_manifest(model_dir: Path, repository: Path, name: str, version: str) -> Path:
    folder = add_version(model_dir, repository, name, version)
    (folder / MANIFEST_NAME).write_text("{not json")
    return folder


def change_version(folder: Path, description: str) -> None:
    """The same graphs under a changed manifest (another digest): a new build of the same version."""
    manifest = load_manifest(folder)
    write_manifest(
        manifest.model_copy(update={"model": manifest.model.model_copy(update={"version": description})}), folder
    )


def model_info(server: ServerProcess) -> set[tuple[str, str]]:
    return {
        (dict(labels)["name"], dict(labels)["version"])
        for (name, labels), v in metrics(server).items()
        if name == "ride_model_info" and v == 1
    }


def v2_image(data: bytes) -> dict:
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}]}


def upscaled(data: bytes, side: int = 384) -> bytes:
    """The image as a larger PNG: it decodes in the decoding pool (a JPEG would decode at 1/8 scale, on the event
    loop), so a request holds its version a while between resolving it and queueing its rows: the window a reload
    must not break."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    small = [data for _, data in cifar10_test_images(per_class=1)]
    return [image for data in small for image in (data, upscaled(data))]


@pytest.fixture(scope="module")
def repository(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny 1 and 2 (valid), tiny 3 (a graph changed after export), other 1 (valid), junk 1 (manifest not JSON),
    flat (a model folder put in as a model, without a version folder)."""
    root = tmp_path_factory.mktemp("repository") / "models"
    add_version(model_dir, root, "tiny", "1")
    add_version(model_dir, root, "tiny", "2")
    add_broken_graph(model_dir, root, "tiny", "3")
    add_version(model_dir, root, "other", "1")
    add_broken_manifest(model_dir, root, "junk", "1")
    shutil.copytree(model_dir, root / "flat")
    return root


@pytest.fixture(scope="module")
def repo_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("repo-server") / "server.log"
    running = start_server(
        repository,
        log_path,
        flag="--model-repository",
        RIDE_DEFAULT_MODEL="tiny",
        RIDE_ADMIN_ROUTES="true",
        RIDE_ADMIN_TOKEN=TOKEN,
        RIDE_PROVIDER="cpu",
    )
    yield running
    running.stop()


def test_versions_order_numerically_when_all_are_integers_else_as_strings() -> None:
    assert version_order(["10", "2", "1"]) == ["1", "2", "10"]
    assert version_order(["10", "2", "b"]) == ["10", "2", "b"]


def test_the_default_model_is_the_setting_else_the_only_one() -> None:
    assert choose_default(Settings(), ["tiny"]) == "tiny"
    assert choose_default(Settings(default_model="b"), ["a", "b"]) == "b"
    with pytest.raises(ModelLoadError, match=r"several models are loaded .*RIDE_DEFAULT_MODEL"):
        choose_default(Settings(), ["a", "b"])
    with pytest.raises(ModelLoadError, match=r"'c' .*not among the models loaded: a, b"):
        choose_default(Settings(default_model="c"), ["a", "b"])


def test_model_dir_and_model_repository_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_dir and model_repository are both set"):
        Settings(model_dir=tmp_path, model_repository=tmp_path)


def start_and_fail(repository: Path, log_path: Path, **env: str) -> tuple[int, str]:
    process, _ = spawn_server(repository, log_path, flag="--model-repository", RIDE_PROVIDER="cpu", **env)
    try:
        returncode = process.wait(timeout=120)
    except Exception:
        process.kill()
        raise
    return returncode, log_path.read_text()


def test_several_models_without_a_default_refuse_to_start(model_dir: Path, tmp_path: Path) -> None:
    add_version(model_dir, tmp_path / "models", "a", "1")
    add_version(model_dir, tmp_path / "models", "b", "1")
    returncode, log = start_and_fail(tmp_path / "models", tmp_path / "server.log")
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert returncode == 1 and "Traceback" not in log
    assert "several models are loaded (a, b)" in line and "RIDE_DEFAULT_MODEL" in line
    returncode, log = start_and_fail(tmp_path / "models", tmp_path / "server2.log", RIDE_DEFAULT_MODEL="c")
    assert returncode == 1 and "'c' (RIDE_DEFAULT_MODEL) is not among the models loaded: a, b" in log


def test_a_repository_without_a_valid_model_refuses_to_start(model_dir: Path, tmp_path: Path) -> None:
    add_broken_manifest(model_dir, tmp_path / "models", "junk", "1")
    returncode, log = start_and_fail(tmp_path / "models", tmp_path / "server.log")
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert returncode == 1 and "has no model that can be served (junk 1:" in line


def test_a_model_folder_put_in_as_a_model_is_refused_with_the_layout_to_use(model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(model_dir, tmp_path / "models" / "ride4")
    returncode, log = start_and_fail(tmp_path / "models", tmp_path / "server.log")
    (line,) = [line for line in log.splitlines() if line.startswith("error:")]
    assert returncode == 1 and "a repository wants <name>/<version>/ folders: move its files into ride4/1/" in line


def test_it_starts_with_the_valid_versions_and_reports_the_others(repo_server: ServerProcess) -> None:
    index = httpx.post(f"{repo_server.url}/v2/repository/index", headers=ADMIN)
    assert index.status_code == 200
    entries = {(e["name"], e["version"]): e for e in index.json()}
    assert set(entries) == {("tiny", "1"), ("tiny", "2"), ("tiny", "3"), ("other", "1"), ("junk", "1"), ("flat", None)}
    assert all(set(e) == {"name", "version", "state", "reason"} for e in entries.values())
    for ready in (("tiny", "1"), ("tiny", "2"), ("other", "1")):
        assert entries[ready]["state"] == "READY" and entries[ready]["reason"] == ""
    assert (
        entries[("tiny", "3")]["state"] == "UNAVAILABLE"
        and "expert_2.onnx has sha256" in entries[("tiny", "3")]["reason"]
    )
    assert entries[("junk", "1")]["state"] == "UNAVAILABLE" and "manifest" in entries[("junk", "1")]["reason"]
    assert entries[("flat", None)]["state"] == "UNAVAILABLE"
    assert entries[("flat", None)]["reason"].endswith("move its files into flat/1/")
    ready_only = httpx.post(f"{repo_server.url}/v2/repository/index", headers=ADMIN, json={"ready": True}).json()
    assert {(e["name"], e["version"]) for e in ready_only} == {("tiny", "1"), ("tiny", "2"), ("other", "1")}
    log = repo_server.log()
    assert "admin routes are on, behind the bearer token" in log and "without a token" not in log
    assert "not serving junk version 1" in log and "not serving tiny version 3" in log
    assert "not serving flat: the folder holds a model itself, not versions" in log
    # Every loaded version is listed, and carried by ride_model_info; the broken ones are not.
    listed = httpx.get(f"{repo_server.url}/v2/models").json()
    assert listed == {
        "default_model": "tiny",
        "models": [{"name": "tiny", "versions": ["1", "2"]}, {"name": "other", "versions": ["1"]}],
    }
    summaries = httpx.get(f"{repo_server.url}/models").json()["models"]
    assert [(m["name"], m["version"]) for m in summaries] == [("tiny", "2"), ("tiny", "1"), ("other", "1")]
    assert model_info(repo_server) == {("tiny", "1"), ("tiny", "2"), ("other", "1")}
    assert httpx.get(f"{repo_server.url}/v2/models/tiny").json()["versions"] == ["1", "2"]
    assert httpx.get(f"{repo_server.url}/v1/models").json() == {"models": ["tiny", "other"]}
    assert "model_repository" in httpx.get(f"{repo_server.url}/v2").json()["extensions"]


def test_routes_carry_the_model_and_version(repo_server: ServerProcess, images: list[bytes]) -> None:
    with httpx.Client(base_url=repo_server.url, timeout=30) as client:
        latest = client.post("/v2/models/tiny/infer", json=v2_image(images[0])).json()
        assert (latest["model_name"], latest["model_version"]) == ("tiny", "2")
        first = client.post("/v2/models/tiny/versions/1/infer", json=v2_image(images[0])).json()
        assert (first["model_name"], first["model_version"]) == ("tiny", "1")
        assert first["outputs"] == latest["outputs"]  # the same export under two versions
        assert client.post("/classify", content=images[0], headers=JPEG).json()["model"] == {
            "name": "tiny",
            "version": "2",
        }
        named = client.post("/classify", content=images[0], headers=JPEG, params={"model": "other"})
        assert named.json()["model"] == {"name": "other", "version": "1"}
        pinned = client.post("/classify", content=images[0], headers=JPEG, params={"model": "tiny", "version": "1"})
        assert pinned.json()["model"] == {"name": "tiny", "version": "1"}
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(images[0]).decode()}}]}
        predicted = client.post("/v1/models/other:predict", json=body).json()
        assert predicted["predictions"][0]["model"] == {"name": "other", "version": "1"}
        assert client.get("/v1/models/other").json() == {"name": "other", "ready": True}


def test_an_unknown_model_or_version_is_404_in_each_protocols_shape(
    repo_server: ServerProcess, images: list[bytes]
) -> None:
    with httpx.Client(base_url=repo_server.url, timeout=30) as client:
        for params in ({"model": "nope"}, {"model": "tiny", "version": "3"}, {"model": "tiny", "version": "9"}):
            answer = client.post("/classify", content=images[0], headers=JPEG, params=params)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", params
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(images[0]).decode()}}]}
        for path in ("/v1/models/nope:predict", "/v1/models/junk:predict"):
            answer = client.post(path, json=body)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", path
        assert client.get("/v1/models/nope").status_code == 404
        for path in ("/v2/models/nope/infer", "/v2/models/tiny/versions/3/infer", "/v2/models/tiny/versions/9/infer"):
            answer = client.post(path, json=v2_image(images[0]))
            assert answer.status_code == 404 and isinstance(answer.json()["error"], str), path
        answer = client.get("/v2/models/tiny/versions/3")
        assert answer.status_code == 404 and "loaded versions: 1, 2" in answer.json()["error"]


def test_the_repository_routes_are_documented_with_examples(repo_server: ServerProcess) -> None:
    paths = httpx.get(f"{repo_server.url}/openapi.json").json()["paths"]
    schemas = httpx.get(f"{repo_server.url}/openapi.json").json()["components"]["schemas"]
    for path in ("/v2/repository/index", "/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"):
        operation = paths[path]["post"]
        assert {"200", "401"} <= set(operation["responses"]), path
        text = json.dumps(operation)
        referenced = [json.dumps(schemas[name]) for name in re.findall(r"#/components/schemas/(\w+)", text)]
        assert any('"example' in part for part in [text, *referenced]), path


def test_the_repository_routes_need_the_admin_token(repo_server: ServerProcess, server: ServerProcess) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/other/load", "/v2/repository/models/other/unload"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = httpx.post(f"{repo_server.url}{path}", headers=headers)
            assert answer.status_code == 401 and isinstance(answer.json()["error"], str), (path, headers)
        # Off unless RIDE_ADMIN_ROUTES is on (the shared test server has them off).
        assert httpx.post(f"{server.url}{path}", headers=ADMIN).status_code == 404
    assert "model_repository" not in httpx.get(f"{server.url}/v2").json()["extensions"]
    assert model_info(repo_server) == {("tiny", "1"), ("tiny", "2"), ("other", "1")}


def test_unload_and_load_change_what_is_served(repo_server: ServerProcess, images: list[bytes]) -> None:
    with httpx.Client(base_url=repo_server.url, timeout=60, headers=ADMIN) as client:
        unloaded = client.post("/v2/repository/models/other/unload")
        assert unloaded.status_code == 200 and unloaded.content == b""
        assert model_info(repo_server) == {("tiny", "1"), ("tiny", "2")}
        assert [m["name"] for m in client.get("/v2/models").json()["models"]] == ["tiny"]
        assert client.post("/v2/models/other/infer", json=v2_image(images[0])).status_code == 404
        entry = [e for e in client.post("/v2/repository/index").json() if e["name"] == "other"]
        assert entry == [{"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert client.post("/v2/repository/models/other/unload").status_code == 404  # not loaded
        loaded = client.post("/v2/repository/models/other/load", json={})
        assert loaded.status_code == 200 and loaded.content == b""
        assert model_info(repo_server) == {("tiny", "1"), ("tiny", "2"), ("other", "1")}
        assert client.post("/v2/models/other/infer", json=v2_image(images[0])).status_code == 200
        missing = client.post("/v2/repository/models/nope/load")
        assert missing.status_code == 404 and "no model 'nope'" in missing.json()["error"]
        refused = client.post("/v2/repository/models/other/load", json={"parameters": {"config": "{}"}})
        assert refused.status_code == 400 and "unsupported parameters: config" in refused.json()["error"]
        # A load of tiny reloads nothing that is unchanged, fails on version 3 and says why; 1 and 2 serve on.
        failed = client.post("/v2/repository/models/tiny/load")
        assert failed.status_code == 400
        assert "tiny version 3:" in failed.json()["error"] and "expert_2.onnx has sha256" in failed.json()["error"]
        assert client.get("/v2/models/tiny").json()["versions"] == ["1", "2"]
        assert model_info(repo_server) == {("tiny", "1"), ("tiny", "2"), ("other", "1")}


def test_a_repository_request_that_is_not_json_says_so(repo_server: ServerProcess) -> None:
    headers = {**ADMIN, "content-type": "application/json"}
    for route in ("/v2/repository/index", "/v2/repository/models/other/load"):
        answer = httpx.post(f"{repo_server.url}{route}", content=b"{bad", headers=headers, timeout=30)
        assert answer.status_code == 400, route
        assert answer.json()["error"].startswith("the body is not valid JSON (Expecting property name"), answer.text


def test_unloading_the_default_model_takes_the_server_out_of_readiness(
    repo_server: ServerProcess, images: list[bytes]
) -> None:
    """The unnamed routes serve the default model: without it the server must not look ready, or a load balancer
    keeps sending requests that cannot be answered. Models that are loaded stay ready by name."""
    with httpx.Client(base_url=repo_server.url, timeout=60, headers=ADMIN) as client:
        assert client.post("/v2/repository/models/tiny/unload").status_code == 200
        for route in ("/readyz", "/v2/health/ready"):
            assert client.get(route).status_code == 503, route
        refused = client.post("/classify", content=images[0], headers=JPEG)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "not_ready"
        assert "the default model 'tiny' is not loaded" in refused.json()["error"]["message"]
        assert "/v2/repository/models/tiny/load" in refused.json()["error"]["message"]
        assert value(metrics(repo_server), "ride_ready") == 0
        assert client.get("/v2/models/other/ready").status_code == 200
        assert client.get("/v1/models/other").status_code == 200
        assert client.post("/v2/models/other/infer", json=v2_image(images[0])).status_code == 200

        client.post("/v2/repository/models/tiny/load")  # 400: version 3 is broken; 1 and 2 load
        assert client.get("/v2/models/tiny").json()["versions"] == ["1", "2"]
        assert client.get("/readyz").status_code == 200
        assert client.post("/classify", content=images[0], headers=JPEG).status_code == 200
        assert value(metrics(repo_server), "ride_ready") == 1


class Load:
    """Threads posting real images to the unnamed routes until stopped: /classify with several files (a request
    then holds its version for a while before its rows are queued: decoding them), and v2 infer with one. Every
    status and every model version answered is counted."""

    def __init__(self, url: str, images: list[bytes], threads: int = 3) -> None:
        self.url = url
        self.images = images
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            sent = offset
            while not self._stop.is_set():
                data = self.images[sent % len(self.images)]
                if sent % 2:
                    answer = client.post("/classify", files=files_for(self.images, sent))
                    ok = answer.status_code == 200
                    versions = [r["model"]["version"] for r in answer.json()["results"]] if ok else []
                else:
                    answer = client.post("/v2/models/tiny/infer", json=v2_image(data))
                    versions = [answer.json()["model_version"]] if answer.status_code == 200 else []
                with self._lock:
                    self.statuses[answer.status_code] += 1
                    self.versions.update(versions)
                    if not versions:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                sent += 1

    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())


def files_for(images: list[bytes], start: int, count: int = 6) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}", images[(start + i) % len(images)], "application/octet-stream")) for i in range(count)]


def wait_for_versions(client: httpx.Client, expected: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/v2/models/tiny").json().get("versions") != expected:
        assert time.monotonic() < deadline, f"versions never became {expected}"
        time.sleep(0.1)


def wait_for_rescan(server: ServerProcess, done_before: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.log().count("rescan done") <= done_before:
        assert time.monotonic() < deadline, "the rescan never finished"
        time.sleep(0.1)


def test_five_reloads_under_load_fail_no_request(model_dir: Path, tmp_path: Path, images: list[bytes]) -> None:
    """Traffic on the unnamed routes throughout five reloads (load route and SIGHUP), one of a broken folder, four
    of them retiring the version that serves the traffic: every request is answered 200, by the version it started
    on; the broken load says why and changes nothing."""
    root = tmp_path / "models"
    add_version(model_dir, root, "tiny", "1")
    server = start_server(
        root, tmp_path / "server.log", flag="--model-repository", RIDE_ADMIN_ROUTES="true", RIDE_PROVIDER="cpu"
    )
    admin = httpx.Client(base_url=server.url, timeout=120)
    assert "admin routes are on (RIDE_ADMIN_ROUTES) without a token: anyone who reaches" in server.log()

    def sighup() -> None:
        rescans = server.log().count("rescan done")
        server.process.send_signal(signal.SIGHUP)
        wait_for_rescan(server, rescans)

    try:
        with Load(server.url, images) as load:

            def answered_more() -> None:
                than = load.answered()
                deadline = time.monotonic() + 60
                while load.answered() < than + 10:
                    assert time.monotonic() < deadline, "the load stopped"
                    time.sleep(0.05)

            answered_more()
            # 1. The serving version rebuilt in place (a new manifest), by the load route.
            change_version(root / "tiny" / "1", "1-rebuilt")
            assert admin.post("/v2/repository/models/tiny/load").status_code == 200
            answered_more()
            # 2. A broken new version, by the load route: refused with its reason; version 1 serves on.
            add_broken_graph(model_dir, root, "tiny", "2")
            failed = admin.post("/v2/repository/models/tiny/load")
            assert failed.status_code == 400 and "tiny version 2:" in failed.json()["error"]
            assert admin.get("/v2/models/tiny").json()["versions"] == ["1"]
            answered_more()
            # 3. SIGHUP after replacing it by a good one and removing version 1: traffic moves to 2, 1 retires.
            shutil.rmtree(root / "tiny" / "2")
            add_version(model_dir, root, "tiny", "2")
            shutil.rmtree(root / "tiny" / "1")
            sighup()
            wait_for_versions(admin, ["2"])
            answered_more()
            # 4. SIGHUP after rebuilding version 2 in place.
            change_version(root / "tiny" / "2", "2-rebuilt")
            sighup()
            answered_more()
            # 5. A new version, and version 2 removed, by the load route.
            add_version(model_dir, root, "tiny", "3")
            shutil.rmtree(root / "tiny" / "2")
            assert admin.post("/v2/repository/models/tiny/load").status_code == 200
            assert admin.get("/v2/models/tiny").json()["versions"] == ["3"]
            answered_more()
        index = admin.post("/v2/repository/index").json()
        assert index == [{"name": "tiny", "version": "3", "state": "READY", "reason": ""}]
        assert model_info(server) == {("tiny", "3")}
    finally:
        admin.close()
        assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log
    assert load.failures == [] and set(load.statuses) == {200}, (load.statuses, load.failures[:5])
    assert {"1", "2", "3"} <= set(load.versions)
    assert log.count("loaded tiny version 1") == 1 and log.count("loaded tiny version 2") == 2
    print(
        f"reload test: {sum(load.statuses.values())} requests ({sum(load.versions.values())} images), statuses "
        f"{dict(load.statuses)}, images by version {dict(load.versions)}"
    )


def test_sighup_reloads_a_model_dir_as_a_repository_of_one(model_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    name, version = load_manifest(folder).model.name, load_manifest(folder).model.version
    server = start_server(folder, tmp_path / "server.log", RIDE_PROVIDER="cpu")
    try:
        assert model_info(server) == {(name, version)}
        change_version(folder, "rebuilt")
        rescans = server.log().count("rescan done")
        server.process.send_signal(signal.SIGHUP)
        wait_for_rescan(server, rescans)
        assert model_info(server) == {(name, "rebuilt")}
        assert httpx.get(f"{server.url}/v2/models/{name}").json()["versions"] == ["rebuilt"]
        # A rescan that finds a broken folder reports it and keeps serving what it had.
        (folder / MANIFEST_NAME).write_text("{not json")
        rescans = server.log().count("rescan done")
        server.process.send_signal(signal.SIGHUP)
        wait_for_rescan(server, rescans)
        assert "rescan: cannot read model folder" in server.log()
        assert model_info(server) == {(name, "rebuilt")}
        image = cifar10_test_images(per_class=1)[0][1]
        answer = httpx.post(f"{server.url}/classify", content=image, headers=JPEG)
        assert answer.status_code == 200 and answer.json()["model"] == {"name": name, "version": "rebuilt"}
    finally:
        assert server.stop() == 0


def test_a_version_taken_out_stops_only_after_its_last_request(loaded_model, model_dir: Path) -> None:
    """Deterministic form of what the reload test samples: a request holding a version keeps it running after the
    version left the table; the version stops once that request is done."""
    state = create_app(Settings(model_dir=model_dir), model=loaded_model).state.service
    pixels = np.zeros((3, 32, 32), dtype=np.float32)

    async def scenario() -> None:
        await state.start()
        try:
            with state.table.use(None) as held:
                (removed,) = state.table.replace(held.name, {})
                retiring = asyncio.create_task(removed.retire(1.0))
                await asyncio.sleep(0.05)
                assert not retiring.done()
                result = await held.batcher.submit(pixels, threshold=0.5, max_experts=3)  # still served
                assert 1 <= result.experts_used <= 3
            await asyncio.wait_for(retiring, 10)
            with pytest.raises(NotReadyError):
                held.batcher.enqueue(pixels, threshold=0.5, max_experts=3)
        finally:
            await state.stop()

    asyncio.run(scenario())
