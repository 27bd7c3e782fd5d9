"""``python -m training.run import-official``: one of our checkpoint folders from a checkpoint of the official RIDE
code (``frank-xwang/RIDE-LongTailRecognition``), so that it can be evaluated, exported and served like ours.

What comes from where:

- the architecture: the file's ``arch`` name (or ``--arch``) and its tensor shapes (:mod:`training.official.arch`);
- the dataset, input size, mean/std, long-tail profile and class counts: the official config's ``data_loader``
  when it is one of the official loaders, with the official loaders' constants;
- what the file does not hold: class names (``--class-names`` or the dataset at ``--data-dir``), class counts for
  datasets whose counts are not a formula (``--class-counts`` or the official ``--train-list``), and any data
  setting (``--set data.KEY=VALUE``, e.g. mean/std for a dataset the official code did not ship).

Every choice is written into the checkpoint's ``imported_from.notes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import sha256_file
from training.checkpoint import CheckpointError, CheckpointMeta, InputInfo, OfficialSource, save_checkpoint
from training.config import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
)
from training.data.cifar import cifar_class_names, find_cifar_dir
from training.data.datasets import class_groups
from training.data.folder import scan_image_folder
from training.data.longtail import longtail_counts
from training.official.arch import ImportedModel, OfficialArch, convert, resolve_arch
from training.official.keys import strip_wrappers
from training.official.safe_load import StandIn, load_official_file, plain
from training.run_folder import prepare_output


@dataclass(frozen=True)
class OfficialDataset:
    """An official data loader (``data_loader/*.py``) in our terms."""

    dataset: str  # our data.dataset
    profile: str  # long-tail profile applied to it
    default_imb_factor: float  # the loader's imb_factor (images of the rarest class / the most common)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    note: str = ""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_TRAIN_IMAGES = 50_000  # both CIFAR training sets are balanced: 5,000 or 500 images per class
CENTER_CROP_NOTE = (
    "the official test transform is Resize(256) + CenterCrop(224); this format resizes the whole image to "
    "224x224 (no crop), so inputs differ slightly from the official evaluation"
)
OFFICIAL_DATASETS = {
    "ImbalanceCIFAR10DataLoader": OfficialDataset("cifar10", "exp", 0.01, 32, CIFAR10_MEAN, CIFAR10_STD),
    "ImbalanceCIFAR100DataLoader": OfficialDataset("cifar100", "exp", 0.01, 32, CIFAR10_MEAN, CIFAR10_STD),
    "CIFAR100DataLoader": OfficialDataset(
        "cifar100",
        "none",
        1.0,
        32,
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
    "ImageNetLTDataLoader": OfficialDataset("folder", "none", 1.0, 224, IMAGENET_MEAN, IMAGENET_STD, CENTER_CROP_NOTE),
    "iNaturalistDataLoader": OfficialDataset(
        "folder", "none", 1.0, 224, (0.466, 0.471, 0.380), (0.195, 0.194, 0.192), CENTER_CROP_NOTE
    ),
}
EQUAL_THRESHOLD_NOTE = (
    "routers: the official cascade continues when sigmoid(router logit) > 0.5, ours when it is >= the threshold "
    "(0.5 stored): the decision differs only for a router logit of exactly 0"
)


@dataclass
class ImportOptions:
    """What the command line adds to the file."""

    arch: str | None = None
    name: str | None = None
    data_dir: Path | None = None
    class_names: Path | None = None
    class_counts: Path | None = None
    train_list: Path | None = None
    overrides: tuple[str, ...] = ()


def official_config(content: dict[str, Any]) -> dict[str, Any] | None:
    """The official config's values: the ConfigParser stand-in's ``_config``, or a plain dict."""
    config = content.get("config")
    if isinstance(config, StandIn) and isinstance(config.state, dict):
        config = config.state.get("_config")
    return plain(config) if isinstance(config, dict) else None


def _section(config: dict[str, Any] | None, name: str) -> dict[str, Any]:
    section = (config or {}).get(name)
    return section if isinstance(section, dict) else {}


def _state_dict(content: Any, path: Path) -> dict[str, Any]:
    """The model's state dict: the trainer checkpoint's ``state_dict``, or the file itself when it is one."""
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a checkpoint dictionary")
    state = content.get("state_dict", content)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} has no state_dict")
    return state


def _data_settings(config: dict[str, Any] | None, arch: OfficialArch, notes: list[str]) -> dict[str, Any]:
    """Our raw ``data`` section from the official data loader, as far as it is known."""
    loader = _section(config, "data_loader")
    official = OFFICIAL_DATASETS.get(loader.get("type"))
    if official is None:
        what = (
            "the file has no data_loader config"
            if not loader
            else f"data loader {loader.get('type')!r} is not official"
        )
        notes.append(f"data: {what}; input size {arch.image_size} from the architecture")
        return {"dataset": "folder", "image_size": arch.image_size, "imbalance_profile": "none"}
    args = _section(loader, "args")
    imb_factor = float(args.get("imb_factor", official.default_imb_factor))
    notes.append(
        f"data: the official {loader['type']} (input {official.image_size}, its mean/std"
        + (f", {official.profile} long tail with imb_factor {imb_factor:g})" if official.profile != "none" else ")")
    )
    if official.note:
        notes.append(f"input: {official.note}")
    return {
        "dataset": official.dataset,
        "image_size": official.image_size,
        "mean": list(official.mean),
        "std": list(official.std),
        "imbalance_profile": official.profile,
        "imbalance_factor": 1.0 / imb_factor,
    }


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise CheckpointError(f"cannot read the {what} file {path}: {error}") from None


def _dataset_classes(dataset: str, root: Path) -> tuple[list[str], list[int]] | None:
    """(class names, training images per class) of the dataset at ``root``, read the way ``load_data`` reads it:
    official CIFAR batches (balanced: 5000 or 500 per class) or an image folder (its files are counted)."""
    if dataset in ("cifar10", "cifar100") and find_cifar_dir(root, dataset) is not None:
        names = cifar_class_names(root, dataset)
        return names, [CIFAR_TRAIN_IMAGES // len(names)] * len(names)
    if (root / "train").is_dir():
        index = scan_image_folder(root)
        return index.classes, np.bincount(index.train_labels, minlength=len(index.classes)).tolist()
    return None


def _class_names(options: ImportOptions, found: tuple[list[str], list[int]] | None, notes: list[str]) -> list[str]:
    if options.class_names is not None:
        notes.append(f"class names: from {options.class_names}")
        return _read_lines(options.class_names, "class names")
    if found is not None:
        notes.append(f"class names: from the dataset at {options.data_dir}")
        return found[0]
    raise CheckpointError(
        "the checkpoint holds no class names: give --class-names FILE (one name per line, in label order) or "
        "--data-dir with the dataset it was trained on"
    )


def _checked_length(values: list, num_classes: int, what: str) -> list:
    if len(values) != num_classes:
        raise CheckpointError(f"{len(values)} {what} for a checkpoint with {num_classes} classes")
    return values


def _counts_from_list(path: Path, num_classes: int) -> list[int]:
    """Images per class of an official dataset list (``ImageNet_LT_train.txt``: ``PATH LABEL`` per line)."""
    labels = []
    for line in _read_lines(path, "train list"):
        fields = line.split()
        if len(fields) < 2 or not fields[-1].isdigit():
            raise CheckpointError(f"{path}: expected 'PATH LABEL' lines, got {line!r}")
        labels.append(int(fields[-1]))
    if max(labels, default=-1) >= num_classes:
        raise CheckpointError(f"{path} has label {max(labels)}, but the checkpoint has {num_classes} classes")
    return np.bincount(labels, minlength=num_classes).tolist()


def _class_counts(
    options: ImportOptions,
    data: dict[str, Any],
    found: tuple[list[str], list[int]] | None,
    num_classes: int,
    notes: list[str],
) -> list[int]:
    if options.class_counts is not None:
        notes.append(f"class counts: from {options.class_counts}")
        lines = _read_lines(options.class_counts, "class counts")
        if not all(line.isdigit() for line in lines):
            raise CheckpointError(f"{options.class_counts}: expected one non-negative integer per line")
        return [int(line) for line in lines]
    if options.train_list is not None:
        notes.append(f"class counts: images per label in {options.train_list}")
        return _counts_from_list(options.train_list, num_classes)
    available: list[int] | None = None
    if found is not None:
        available = found[1]
    elif data["dataset"] in ("cifar10", "cifar100"):
        available = [CIFAR_TRAIN_IMAGES // num_classes] * num_classes
    if available is None or len(available) != num_classes:
        raise CheckpointError(
            "the checkpoint's training counts per class are not a formula of its config: give --class-counts FILE "
            "(one count per line) or --train-list with the official list (e.g. ImageNet_LT_train.txt)"
        )
    profile, factor = data["imbalance_profile"], float(data["imbalance_factor"])
    source = f"the dataset at {options.data_dir}" if found is not None else f"{data['dataset']}'s balanced training set"
    shape = "as they are" if profile == "none" else f"with the {profile} long tail of imbalance factor {factor:g}"
    notes.append(f"class counts: {source}, {shape}")
    return longtail_counts(available, num_classes, profile, factor)


def _check_against_config(imported: ImportedModel, args: dict[str, Any]) -> None:
    """The config's class and expert counts, when it has them, must be those of the weights."""
    found = {"num_classes": imported.num_classes, "num_experts": imported.model.num_experts}
    for key, value in found.items():
        said = args.get(key)
        if isinstance(said, int) and said != value:
            raise CheckpointError(
                f"the checkpoint's config says arch.args.{key} = {said}, but its weights have {value}: the file "
                "contradicts itself"
            )


def _stage(arch: OfficialArch, config: dict[str, Any] | None) -> str:
    if arch.routed:
        return "routers"
    return "distilled" if (config or {}).get("distill") is True else "experts"


def _train_config(
    name: str, imported: ImportedModel, data: dict[str, Any], config: dict[str, Any] | None, options: ImportOptions
) -> TrainConfig:
    """Our TrainConfig describing the imported model: model and routers from the weights, data as resolved."""
    bad = [item for item in options.overrides if not item.strip().startswith("data.")]
    if bad:
        raise ConfigError(
            f"import-official accepts only data.* settings with --set (the model comes from the weights): {bad[0]}"
        )
    raw: dict[str, Any] = {"name": name, "data": data, "model": imported.model.model_dump()}
    if imported.routers is not None:
        router = {"top_z": imported.routers.top_z, "hidden": imported.routers.hidden}
        pos_weight = _section(_section(config, "arch"), "args").get("pos_weight")
        if isinstance(pos_weight, int | float) and pos_weight > 0:
            router["pos_weight"] = float(pos_weight)
        raw["router"] = router
    raw = apply_overrides(raw, list(options.overrides))
    if "mean" not in raw["data"] or "std" not in raw["data"]:
        raise ConfigError(
            "the official data loader is unknown, so mean/std are too: give --set data.mean=[R,G,B] --set "
            "data.std=[R,G,B] (the values the model was trained with)"
        )
    return config_from_dict(raw, "import-official")


def import_official(checkpoint: Path, out: Path, options: ImportOptions | None = None) -> Path:
    """Write the checkpoint folder ``out`` from the official checkpoint file ``checkpoint``; return ``out``.

    Raises CheckpointError (UnsafePickleError for a file that tries to run code), ConfigError or DataError with
    a message naming what is wrong; nothing is written then.
    """
    options = options or ImportOptions()
    checkpoint, out = Path(checkpoint), Path(out)
    official = load_official_file(checkpoint)
    content = official.content
    state = _state_dict(content, checkpoint)
    config = official_config(content) if isinstance(content, dict) else None
    arch_section = _section(config, "arch")
    file_arch = content.get("arch") if "state_dict" in content else None
    arch = resolve_arch(file_arch, arch_section.get("type"), options.arch)
    imported = convert(arch, strip_wrappers(state), _section(arch_section, "args"))
    _check_against_config(imported, _section(arch_section, "args"))

    notes = [f"architecture: {arch.name} -> {imported.model.arch}, {imported.model.num_experts} experts"]
    if imported.model.classifier == "cosine":
        notes.append(f"cosine scale s = {imported.model.scale:g} (not stored in the weights: config or default 30)")
    if imported.routers is not None:
        notes.append(f"routers: top-z {imported.routers.top_z}, shared output layer {imported.routers.shared_fc}")
        notes.append(EQUAL_THRESHOLD_NOTE)
    data = _data_settings(config, arch, notes)
    if options.data_dir is not None:
        data["root"] = str(options.data_dir)
    cfg = _train_config(options.name or out.name, imported, data, config, options)
    found = None if options.data_dir is None else _dataset_classes(cfg.data.dataset, Path(options.data_dir))
    names = _checked_length(_class_names(options, found, notes), imported.num_classes, "class names")
    counts = _class_counts(options, cfg.data.model_dump(), found, imported.num_classes, notes)
    counts = _checked_length(counts, imported.num_classes, "class counts")

    epoch = content.get("epoch") if isinstance(content.get("epoch"), int) else None
    planned = _section(config, "trainer").get("epochs")
    meta = CheckpointMeta(
        name=cfg.name,
        stage=_stage(arch, config),
        model=imported.model,
        num_classes=imported.num_classes,
        class_names=names,
        class_counts=counts,
        class_groups=class_groups(counts, cfg.data.many_shot_above, cfg.data.few_shot_below),
        input=InputInfo(image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std),
        config=cfg,
        epoch=epoch or 0,
        epochs=planned if isinstance(planned, int) else epoch or 0,
        # The official trainer saves only finished epochs, and an import is never resumed: it is complete.
        complete=True,
        routers=imported.routers,
        router_config=cfg.router if imported.routers is not None else None,
        imported_from=OfficialSource(
            file=checkpoint.name,
            sha256=sha256_file(checkpoint),
            arch=arch.name,
            epoch=epoch,
            config=config,
            stand_ins=official.stand_ins,
            notes=notes,
        ),
    )
    prepare_output(out, resume=False)
    save_checkpoint(out, imported.state, meta)
    return out
