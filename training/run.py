"""Command line: ``python -m training.run {train,evaluate,route,distill,recipe,compare,import-official} ...``.

Every expected failure (bad config, bad data, bad checkpoint) ends with one ``error:`` line and exit status 2,
never a traceback from deep inside torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config
from training.data import DataError

EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError)


def _config_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--config", type=Path, required=required, help="TOML config file (see configs/)")
    _set_argument(parser, "override one config value, e.g. --set schedule.epochs=20")


def _set_argument(parser: argparse.ArgumentParser, help_text: str, metavar: str = "KEY=VALUE") -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected into ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar=metavar, help=f"{help_text} (repeatable)"
    )


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="dataset folder (overrides data.root)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides runtime.device")


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--device`` as one more (so it wins over a ``--set runtime.device``)."""
    return [*args.overrides, f"runtime.device={args.device}"] if args.device is not None else list(args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train

    cfg = load_config(args.config, _overrides(args))
    out = args.out or Path("runs") / cfg.name
    train(cfg, out=out, data_dir=args.data_dir, resume=args.resume)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate_checkpoint import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device_choice=args.device or "auto")


def cmd_route(args: argparse.Namespace) -> None:
    from training.route import route_checkpoint

    route_checkpoint(
        args.checkpoint,
        config_path=args.config,
        overrides=_overrides(args),
        out=args.out,
        data_dir=args.data_dir,
        target_compute=args.target_compute,
        threshold=args.threshold,
    )


def cmd_distill(args: argparse.Namespace) -> None:
    from training.distill import load_teacher
    from training.train import train

    cfg = load_config(args.config, _overrides(args))
    out = args.out or Path("runs") / cfg.name
    train(cfg, out=out, data_dir=args.data_dir, resume=args.resume, teacher=load_teacher(args.teacher, cfg))


def cmd_recipe(args: argparse.Namespace) -> None:
    from training.recipe import run_recipe

    cfg = load_config(args.config, _overrides(args))
    run_recipe(
        cfg,
        out=args.out,
        data_dir=args.data_dir,
        target_compute=args.target_compute,
        export_to=args.export,
        status_only=args.status,
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from training.compare import compare

    print(compare(args.runs, baseline=args.baseline, plot=args.plot))
    if args.plot is not None:
        print(f"\nwrote {args.plot}")


def cmd_import_official(args: argparse.Namespace) -> None:
    from training.official.importer import ImportOptions, import_official

    options = ImportOptions(
        arch=args.arch,
        name=args.name,
        data_dir=args.data_dir,
        class_names=args.class_names,
        class_counts=args.class_counts,
        train_list=args.train_list,
        overrides=tuple(args.overrides),
    )
    out = import_official(args.checkpoint, args.out, options)
    print(f"imported {args.checkpoint} into {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="stage 1: train the experts (or a baseline)")
    _config_arguments(train, required=False)
    _common_arguments(train)
    train.add_argument("--out", type=Path, help="checkpoint folder (default runs/<name>)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on its test split")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    _common_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    route = commands.add_parser("route", help="stage 2: train the routers of a stage-1 checkpoint, curve, threshold")
    route.add_argument("--checkpoint", type=Path, required=True, help="stage-1 checkpoint folder")
    route.add_argument(
        "--config", type=Path, help="TOML config (default: the checkpoint's own); [model] must match the checkpoint"
    )
    _set_argument(route, "override one config value, e.g. --set router.pos_weight=50")
    _common_arguments(route)
    route.add_argument("--out", type=Path, help="routed checkpoint folder (default: <checkpoint>-routers)")
    choice = route.add_mutually_exclusive_group()
    choice.add_argument(
        "--target-compute",
        type=float,
        metavar="F",
        help="store the threshold with the best validation accuracy at relative compute <= F (0 < F <= 1)",
    )
    choice.add_argument("--threshold", type=float, metavar="T", help="store this threshold (0..1; default 0.5)")
    route.set_defaults(handler=cmd_route)

    distill = commands.add_parser("distill", help="train a student with fewer experts from a teacher checkpoint")
    distill.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint folder")
    _config_arguments(distill, required=True)
    _common_arguments(distill)
    distill.add_argument("--out", type=Path, help="checkpoint folder (default runs/<name>)")
    distill.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    distill.set_defaults(handler=cmd_distill)

    recipe = commands.add_parser(
        "recipe", help="start or continue the whole recipe (stage 1, routers, export) and say where it stands"
    )
    _config_arguments(recipe, required=True)
    _common_arguments(recipe)
    recipe.add_argument("--out", type=Path, required=True, help="stage-1 folder; DIR-routers and DIR-model follow it")
    recipe.add_argument("--target-compute", type=float, metavar="F", help="stage 2 threshold for this compute target")
    recipe.add_argument("--export", type=Path, help="model folder to export to (default DIR-model)")
    recipe.add_argument("--status", action="store_true", help="only say where the recipe stands")
    recipe.set_defaults(handler=cmd_recipe)

    comparison = commands.add_parser(
        "compare", help="evaluated checkpoints side by side (Markdown table, optional bar chart); runs no model"
    )
    comparison.add_argument("runs", type=Path, nargs="+", help="checkpoint folders, each evaluated")
    comparison.add_argument("--baseline", type=Path, help="show each accuracy's difference to this run, in points")
    comparison.add_argument("--plot", type=Path, help="also write a bar chart (PNG) here")
    comparison.set_defaults(handler=cmd_compare)

    imports = commands.add_parser(
        "import-official", help="a checkpoint folder from a checkpoint of the official RIDE code (.pth)"
    )
    imports.add_argument("--checkpoint", type=Path, required=True, help="the official checkpoint file (.pth)")
    imports.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    imports.add_argument(
        "--arch", help="official model class (e.g. ResNeXt50EAModel) when the file's own arch is missing or wrong"
    )
    imports.add_argument("--name", help="checkpoint name (default: the --out folder's name)")
    imports.add_argument(
        "--data-dir", type=Path, help="the dataset it was trained on: class names (and counts) are read from it"
    )
    imports.add_argument("--class-names", type=Path, metavar="FILE", help="class names, one per line, label order")
    counts = imports.add_mutually_exclusive_group()
    counts.add_argument("--class-counts", type=Path, metavar="FILE", help="training images per class, one per line")
    counts.add_argument(
        "--train-list", type=Path, metavar="FILE", help="the official training list (PATH LABEL lines), counted"
    )
    _set_argument(imports, "a data setting, e.g. --set data.mean=[0.5,0.5,0.5]", metavar="data.KEY=VALUE")
    imports.set_defaults(handler=cmd_import_official)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last saved checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
