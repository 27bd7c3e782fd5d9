"""Accuracy of a served model folder on an image-folder test split, through the service's own code path.

Every JPEG goes through `service.images.ImageDecoder` and `cascade.run_cascade` on onnxruntime, exactly
as `POST /classify` would (without HTTP), so the numbers are what users get. Reports routed accuracy (the
manifest's default threshold) and all-experts accuracy, overall and per many / medium / few group, the
histogram of experts used and the mean relative compute. Needs only the service's environment (no torch).

    python bench/default_model_accuracy.py [--model-dir models/cifar10-lt-ride4] [--data-dir ../shared/data/cifar10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cascade import run_cascade
from service.images import ImageDecoder
from service.model import load_model

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("many", "medium", "few")


def load_test_split(data_dir: Path, decoder: ImageDecoder, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    test = data_dir / "test"
    missing = [name for name in class_names if not (test / name).is_dir()]
    if missing:
        raise SystemExit(f"error: {test} has no folder for classes {missing}")
    images, labels = [], []
    for label, name in enumerate(class_names):
        for path in sorted((test / name).iterdir()):
            images.append(decoder.decode(path.read_bytes()))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def summarise(predictions: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict:
    per_class = np.array([(predictions[labels == c] == c).mean() for c in range(len(groups))])
    result = {"top1": float((predictions == labels).mean())}
    for group in GROUPS:
        members = [c for c, g in enumerate(groups) if g == group]
        result[group] = float(per_class[members].mean()) if members else None
    return result


def evaluate(model_dir: Path, data_dir: Path, batch_size: int = 256) -> dict:
    model = load_model(model_dir, provider="cpu")
    manifest = model.manifest
    decoder = ImageDecoder(manifest.input, max_pixels=25_000_000)
    class_names = [c.name for c in manifest.classes]
    groups = [c.group for c in manifest.classes]
    images, labels = load_test_split(data_dir, decoder, class_names)
    report: dict = {"model": manifest.model.name, "version": manifest.model.version, "images": len(labels)}
    settings = {
        "routed": {"thresholds": manifest.cascade.default_threshold, "max_experts": model.num_experts},
        "all_experts": {"thresholds": 0.0, "max_experts": model.num_experts},
    }
    for name, options in settings.items():
        predictions, used, compute = [], [], []
        for start in range(0, len(labels), batch_size):
            result = run_cascade(model, images[start : start + batch_size], **options)
            predictions.append(result.logits.argmax(axis=1))
            used.append(result.experts_used)
            compute.append(result.relative_compute)
        used_all = np.concatenate(used)
        report[name] = {
            **summarise(np.concatenate(predictions), labels, groups),
            "mean_experts_used": float(used_all.mean()),
            "experts_used_histogram": {str(k): int((used_all == k).sum()) for k in range(1, model.num_experts + 1)},
            "mean_relative_compute": float(np.concatenate(compute).mean()),
        }
    report["routed"]["threshold"] = manifest.cascade.default_threshold
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-lt-ride4")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = evaluate(args.model_dir, args.data_dir)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} ({report['version']}) on {report['images']} images of {args.data_dir / 'test'}")
    print(f"  {'':<12}{'overall':>9}{'many':>9}{'medium':>9}{'few':>9}{'experts':>9}{'compute':>9}")
    for name in ("routed", "all_experts"):
        row = report[name]
        cells = [row["top1"], *(row[g] for g in GROUPS)]
        text = "".join(f"{'n/a' if v is None else f'{100 * v:.2f}':>9}" for v in cells)
        print(f"  {name:<12}{text}{row['mean_experts_used']:>9.3f}{row['mean_relative_compute']:>9.3f}")
    print(f"  routed experts-used histogram: {report['routed']['experts_used_histogram']}")


if __name__ == "__main__":
    main()
