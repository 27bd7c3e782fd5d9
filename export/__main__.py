"""Command line of the exporter.

    python -m export --checkpoint DIR --out models/NAME [--opset N] [--fp16] [--force] [--data-dir DIR]
                     [--name NAME] [--version V] [--num-images N]
    python -m export verify models/NAME [--checkpoint DIR] [--data-dir DIR] [--num-images N] [--provider cpu|cuda]

Exit status: 0 on success; 1 when the graphs do not match the checkpoint (parity, with a short report); 2 for
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

EXIT_PARITY = 1
EXIT_ERROR = 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shared_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="images to verify on: a dataset folder (test/<class>/*), a "
        "folder of <class>/* test images, or CIFAR batches (default: the checkpoint's data.root)",
    )
    parser.add_argument("--num-images", type=int, default=256, help="test images used for verification (256)")


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
    parser.add_argument("--force", action="store_true", help="replace an existing model folder at --out")
    parser.add_argument("--name", help="model name in the manifest (default: the --out folder's name)")
    parser.add_argument("--version", help="model version (default: <stage>-e<epoch>-<weights sha256 prefix>)")
    _shared_arguments(parser)
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
        force=args.force,
        data_dir=args.data_dir,
        name=args.name,
        version=args.version,
        num_images=args.num_images,
        log=_log,
    )


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verify = bool(argv) and argv[0] == "verify"
    args = (verify_parser() if verify else export_parser()).parse_args(argv[1:] if verify else argv)
    if args.num_images < 1:
        _log("error: --num-images must be at least 1")
        return EXIT_ERROR
    # Imported here so that `--help` and argument errors stay fast (torch takes seconds to import).
    from export.graphs import ExportError
    from export.verify import VerificationError
    from training.checkpoint import CheckpointError
    from training.data import DataError

    try:
        (_run_verify if verify else _run_export)(args)
    except VerificationError as error:
        _log(f"error: {error}")
        return EXIT_PARITY if error.report is not None else EXIT_ERROR
    except (ExportError, ManifestError, CheckpointError, DataError) as error:
        _log(f"error: {error}")
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
