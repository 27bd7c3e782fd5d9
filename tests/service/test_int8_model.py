"""An int8 model folder served by a real `python -m service`: its precision, calibration and parity gate in the
model metadata, and answers that are the int8 cascade's."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from cascade import run_cascade
from export.manifest import load_manifest
from service.images import ImageDecoder
from service.model import load_model
from tests.server_process import start_server


def test_int8_model_is_served_and_described(
    early_exit_int8_model_dir: Path, test_images: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    manifest = load_manifest(early_exit_int8_model_dir)
    quantization = manifest.quantization
    bodies = [data for _, data in test_images[:12]]
    server = start_server(early_exit_int8_model_dir, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            (summary,) = client.get("/models").json()["models"]
            v2 = client.get(f"/v2/models/{manifest.model.name}").json()
            answers = [
                client.post("/classify", content=body, headers={"content-type": "image/jpeg"}).json() for body in bodies
            ]
    finally:
        server.stop()
    assert summary["precision"] == "int8"
    assert summary["quantization"]["calibration"] == quantization.calibration.model_dump()
    assert summary["quantization"]["parity_gate"] == quantization.parity_gate.model_dump()
    parameters = v2["parameters"]
    assert parameters["precision"] == "int8" and parameters["graphs"]["trunk.onnx"] == "int8"
    assert parameters["calibration"]["split"] == "train"
    assert parameters["parity_gate"]["num_images"] == 30
    assert v2["inputs"][1] == {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}  # QDQ graphs: float32
    # The same answers as the int8 cascade run in-process on the service's own decoding.
    model = load_model(early_exit_int8_model_dir, provider="cpu", shared_thread_pool=False)
    decoder = ImageDecoder(manifest.input, max_pixels=25_000_000)
    images = np.stack([decoder.decode(body) for body in bodies])
    expected = run_cascade(model, images, thresholds=manifest.cascade.default_threshold, max_experts=3)
    assert [a["experts_used"] for a in answers] == expected.experts_used.tolist()
    assert [a["class_id"] for a in answers] == expected.probabilities.argmax(axis=1).tolist()
