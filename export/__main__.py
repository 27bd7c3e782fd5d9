"""Command line of the exporter.

    python -m export --checkpoint DIR --out models/NAME [--opset N] [--fp16 | --int8] [--force] [--data-dir DIR]
                     [--name NAME] [--version V] [--num-images N] [--calibration-images N] [--max-accuracy-drop P]
    python -m export quantize models/NAME --out models/NAME-int8 --config FILE [--set KEY=VALUE ...]
                     [--data-dir DIR] [--calibration-images N] [--max-accuracy-drop P] [--force] [--name] [--version]
    python -m export curve models/NAME --config FILE [--set KEY=VALUE ...] [--data-dir DIR]
    python -m export verify models/NAME [--checkpoint DIR] [--data-dir DIR] [--num-images N] [--provider cpu|cuda]

Exit status: 0 on success; 1 when the graphs do not match the checkpoint (parity, with a short report) or an
int8 model fails its parity gate; 2 for
every other expected problem (bad arguments, missing or corrupt checkpoint, data, an existing --out, a manifest
that does not match its schema, a graph whose hash does not match, a checkpoint other than the exported one),
each reported as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from export.manifest import ManifestError
from export.parity_gate import DEFAULT_MAX_ACCURACY_DROP
from export.quantize import DEFAULT_CALIBRATION_IMAGES

EXIT_PARITY = 1
EXIT_ERROR = 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shared_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="images to verify on: a dataset folder (test/<class>/*), a "
        "folder of <class>/* test images, or CIFAR batches (default: the checkpoint's data.root); int8 exports and "
        "verification also read the training and validation splits from it, so it must then be the dataset folder",
    )
    parser.add_argument("--num-images", type=int, default=256, help="test images used for verification (256)")


def _int8_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"int8: training images that calibrate the activation ranges ({DEFAULT_CALIBRATION_IMAGES})",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULT_MAX_ACCURACY_DROP,
        help="int8: refuse the model when its validation accuracy is more than this many points below float32's "
        f"({DEFAULT_MAX_ACCURACY_DROP:g})",
    )


def _training_data_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands without a checkpoint: the training run's config names the data they rebuild splits from."""
    parser.add_argument("--config", type=Path, required=True, help="the training run's config (TOML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--data-dir", type=Path, help="dataset folder (default: the config's data.root)")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a RIDE checkpoint into a verified model folder of ONNX graphs "
        "(or `python -m export verify FOLDER` to re-check one).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder written by training")
    parser.add_argument("--out", type=Path, required=True, help="model folder to create, e.g. models/NAME")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    parser.add_argument("--fp16", action="store_true", help="float16 weights, inputs and outputs (GPU path)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="int8 graphs (onnxruntime static quantization, QDQ, per-channel weights), calibrated on training "
        "images and gated against float32 on the validation split",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing model folder at --out")
    parser.add_argument("--name", help="model name in the manifest (default: the --out folder's name)")
    parser.add_argument("--version", help="model version (default: <stage>-e<epoch>-<weights sha256 prefix>)")
    _shared_arguments(parser)
    _int8_arguments(parser)
    return parser


def quantize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export quantize",
        description="Quantize a verified float32 model folder to int8 when its checkpoint is not at hand: the "
        "training run's data config rebuilds the training split (calibration) and the validation split (the "
        "parity gate), checked against the manifest's classes and training counts.",
    )
    parser.add_argument("folder", type=Path, help="float32 model folder, e.g. models/NAME")
    parser.add_argument("--out", type=Path, required=True, help="int8 model folder to create")
    _training_data_arguments(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing model folder at --out")
    parser.add_argument("--name", help="model name (default: the --out folder's name)")
    parser.add_argument("--version", help="model version (default: the float32 model's, plus -int8)")
    _int8_arguments(parser)
    return parser


def curve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export curve",
        description="Add the validation accuracy/compute curve to a model folder exported before manifest format 3 "
        "(its graphs are untouched): the training run's data config rebuilds the validation split, checked "
        "against the manifest's classes and training counts; the manifest is rewritten in format 3.",
    )
    parser.add_argument("folder", type=Path, help="model folder, e.g. models/NAME")
    _training_data_arguments(parser)
    return parser


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export verify",
        description="Re-check a model folder: manifest schema, graph hashes and rules, known answers, parity with "
        "its checkpoint; print the folder's digest (for RIDE_MODEL_SHA256).",
    )
    parser.add_argument("folder", type=Path, help="model folder, e.g. models/NAME")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to compare with (default: the manifest's)")
    parser.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="onnxruntime provider to run the graphs on (cuda: with the service's options, TF32 off; needs "
        "onnxruntime-gpu and a GPU)",
    )
    _shared_arguments(parser)
    return parser


def _run_export(args: argparse.Namespace) -> None:
    from export.build import export_checkpoint

    export_checkpoint(
        args.checkpoint,
        args.out,
        opset=args.opset,
        fp16=args.fp16,
        int8=args.int8,
        force=args.force,
        data_dir=args.data_dir,
        name=args.name,
        version=args.version,
        num_images=args.num_images,
        calibration_images=args.calibration_images,
        max_accuracy_drop_points=args.max_accuracy_drop,
        log=_log,
    )


def _run_quantize(args: argparse.Namespace) -> None:
    from export.build import quantize_model
    from training.config import load_config

    quantize_model(
        args.folder,
        args.out,
        load_config(args.config, args.set).data,
        data_dir=args.data_dir,
        force=args.force,
        name=args.name,
        version=args.version,
        calibration_images=args.calibration_images,
        max_accuracy_drop_points=args.max_accuracy_drop,
        log=_log,
    )


def _run_curve(args: argparse.Namespace) -> None:
    from export.build import add_curve_to_folder
    from training.config import load_config

    add_curve_to_folder(args.folder, load_config(args.config, args.set).data, data_dir=args.data_dir, log=_log)


def _run_verify(args: argparse.Namespace) -> None:
    from export.manifest import folder_digest
    from export.verify import verify_model_folder

    report = verify_model_folder(
        args.folder,
        checkpoint=args.checkpoint,
        data_dir=args.data_dir,
        num_images=args.num_images,
        provider=args.provider,
    )
    _log(report.summary())
    print(f"{args.folder}: OK ({args.provider})")
    print(f"folder digest (serve only this folder with RIDE_MODEL_SHA256={folder_digest(args.folder)})")


_COMMANDS = {
    "verify": (verify_parser, _run_verify),
    "quantize": (quantize_parser, _run_quantize),
    "curve": (curve_parser, _run_curve),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in _COMMANDS else None
    parser, run = _COMMANDS.get(command, (export_parser, _run_export))
    args = parser().parse_args(argv[1:] if command else argv)
    if getattr(args, "num_images", 1) < 1:
        _log("error: --num-images must be at least 1")
        return EXIT_ERROR
    if getattr(args, "calibration_images", 1) < 1 or getattr(args, "max_accuracy_drop", 0.0) < 0:
        _log("error: --calibration-images must be at least 1 and --max-accuracy-drop at least 0")
        return EXIT_ERROR
    # Imported here so that `--help` and argument errors stay fast (torch takes seconds to import).
    from export.graphs import ExportError
    from export.verify import VerificationError
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.data import DataError

    try:
        run(args)
    except VerificationError as error:
        _log(f"error: {error}")
        return EXIT_PARITY if error.report is not None else EXIT_ERROR
    except (ExportError, ManifestError, CheckpointError, DataError, ConfigError) as error:
        _log(f"error: {error}")
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
