"""Checkpoint format: weights as safetensors plus a JSON sidecar that says how to rebuild and use them.

A checkpoint is a folder:

- ``model.safetensors``: the model's state dict (routers, when trained, under the ``routers.`` prefix).
- ``checkpoint.json``: :class:`CheckpointMeta` (architecture, classes, counts, groups, input, config, metrics,
  versions). Written last, so a folder with a sidecar always has the weights it describes.
- ``train_state.safetensors``: optimizer state for ``--resume`` (SGD momentum buffers, keyed by parameter name).

Nothing is pickled: loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cascade import Threshold
from export.manifest import sha256_file
from training.atomic import atomic_write, atomic_write_json
from training.config import ModelConfig, RouterConfig, TrainConfig
from training.data.errors import DataError
from training.metrics import CheckpointMetrics
from training.models import RIDEModel, build_model
from training.models.router import Routers

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
TRAIN_STATE_FILE = "train_state.safetensors"
FORMAT_VERSION = 1
ROUTERS_PREFIX = "routers."  # router weights live in the model's weights file under this prefix


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or incompatible with the request."""


class InputInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"


class RouterInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_z: int
    hidden: int
    shared_fc: bool = Field(True, description="One output layer W2 for all routers (False: one per router).")
    threshold: Threshold = Field(description="Chosen decision threshold; the service's default.")
    threshold_source: str = "default"


class OfficialSource(BaseModel):
    """Where an imported checkpoint came from: a file written by the official RIDE code (``import-official``)."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="The official checkpoint's file name.")
    sha256: str = Field(description="sha256 of that file.")
    arch: str = Field(description="The official model class, e.g. ResNeXt50EAModel.")
    epoch: int | None = Field(None, description="The epoch the official trainer saved.")
    config: dict[str, Any] | None = Field(None, description="The official config (its ConfigParser's values).")
    stand_ins: list[str] = Field(
        default_factory=list, description="Globals of the file read as inert stand-ins (never imported or called)."
    )
    notes: list[str] = Field(default_factory=list, description="Where each setting came from, and what differs.")


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    stage: Literal["experts", "routers", "distilled"] = "experts"
    model: ModelConfig
    num_classes: int
    class_names: list[str]
    class_counts: list[int]
    class_groups: list[Literal["many", "medium", "few"]]
    input: InputInfo
    config: TrainConfig
    epoch: int = Field(description="Last completed epoch of the stage that wrote this checkpoint.")
    epochs: int = Field(description="Epochs planned for that stage.")
    complete: bool = Field(description="False while training is still running (a resumable intermediate state).")
    routers: RouterInfo | None = None
    router_config: RouterConfig | None = None
    metrics: CheckpointMetrics | None = None
    parent: str | None = Field(None, description="sha256 of the weights this checkpoint was trained from.")
    imported_from: OfficialSource | None = Field(None, description="Set when imported from the official code.")
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""


def tool_versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), "torch": torch.__version__, "ride_serve": version("ride-serve")}


def weights_sha256(folder: Path) -> str:
    """sha256 of the weights file: what a routed checkpoint, a student and a model folder record as their source."""
    return sha256_file(Path(folder) / WEIGHTS_FILE)


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def save_checkpoint(folder: Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write weights, then the sidecar, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _contiguous_cpu(state_dict)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"epoch": str(meta.epoch)}))
    save_meta(folder, meta)


def save_meta(folder: Path, meta: CheckpointMeta) -> None:
    """(Re)write the sidecar alone, e.g. to record new evaluation metrics."""
    stamped = meta.model_copy(update={"versions": tool_versions(), "created_at": datetime.now(UTC).isoformat()})
    atomic_write_json(Path(folder) / META_FILE, json.loads(stamped.model_dump_json()))


def load_meta(folder: Path) -> CheckpointMeta:
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {META_FILE}: not a checkpoint written by `python -m training.run`")
    try:
        return CheckpointMeta.model_validate_json(path.read_text())
    except ValidationError as error:
        raise CheckpointError(f"{path} is not a valid checkpoint sidecar:\n{error}") from None


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or unreadable ({error}); re-train or restore it") from None


def load_checkpoint(folder: Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    meta = load_meta(folder)
    return meta, load_weights(folder)


def split_state(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state dict into (keys under ``prefix``, with it stripped) and the rest."""
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return inside, rest


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a message that says which keys differ instead of a torch traceback."""
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise CheckpointError(f"{what} does not match the architecture: " + "; ".join(problems))


def model_from_checkpoint(folder: Path) -> tuple[RIDEModel, CheckpointMeta, dict[str, torch.Tensor]]:
    """The stage-1 model (eval mode, CPU) with its weights loaded, the sidecar, and the weights it did not use
    (the routers, if any)."""
    meta, weights = load_checkpoint(folder)
    model, rest = model_from_weights(meta, weights, f"checkpoint {folder}")
    return model, meta, rest


def model_from_weights(
    meta: CheckpointMeta, weights: dict[str, torch.Tensor], what: str
) -> tuple[RIDEModel, dict[str, torch.Tensor]]:
    """The stage-1 model that ``meta`` describes (eval mode, CPU) with its part of ``weights``, and the rest."""
    model = build_model(meta.model, meta.num_classes)
    own = {k: v for k, v in weights.items() if k in model.state_dict()}
    rest = {k: v for k, v in weights.items() if k not in own}
    load_into(model, own, what)
    model.eval()
    return model, rest


def check_same_classes(meta: CheckpointMeta, class_names: Sequence[str], source: str) -> None:
    """DataError unless ``class_names``, found in ``source``, are the checkpoint's classes in the same order."""
    if list(class_names) != meta.class_names:
        raise DataError(
            f"{source} has the classes {list(class_names)[:5]}... ({len(class_names)}), but checkpoint {meta.name!r} "
            f"was trained on {meta.class_names[:5]}... ({meta.num_classes}): it needs the same classes in the same "
            "order; point --data-dir at the dataset it was trained on"
        )


def routers_from_checkpoint(
    meta: CheckpointMeta, extra_weights: dict[str, torch.Tensor], feature_dim: int
) -> Routers | None:
    """The routers of a checkpoint (eval mode, CPU), or None when it has none (``meta.routers is None``).

    ``extra_weights`` may be the whole state dict or what :func:`model_from_checkpoint` left over; only the
    ``routers.`` keys are read.
    """
    if meta.routers is None:
        return None
    state, _ = split_state(extra_weights, ROUTERS_PREFIX)
    if not state:
        raise CheckpointError(
            f"checkpoint {meta.name!r} says it has routers but its weights hold no '{ROUTERS_PREFIX}' keys"
        )
    info = meta.routers
    routers = Routers(meta.model.num_experts, meta.num_classes, feature_dim, info.top_z, info.hidden, info.shared_fc)
    load_into(routers, state, f"router weights of checkpoint {meta.name!r}")
    return routers.eval()


def router_state(routers: Routers) -> dict[str, torch.Tensor]:
    """Router weights under the checkpoint prefix ``routers.``, to be saved with the model's."""
    return {f"{ROUTERS_PREFIX}{key}": value for key, value in routers.state_dict().items()}


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, names: dict[int, str], epoch: int) -> None:
    """Save SGD momentum buffers keyed by parameter name (no pickle)."""
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum.{names[id(param)]}"] = buffer
    atomic_write(
        Path(folder) / TRAIN_STATE_FILE,
        lambda tmp: save_file(_contiguous_cpu(tensors), str(tmp), metadata={"epoch": str(epoch)}),
    )


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> int:
    """Restore momentum buffers; return the epoch they belong to."""
    path = Path(folder) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {TRAIN_STATE_FILE}: nothing to resume (train without --resume)")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            epoch = int(json.loads(handle.read(header_len))["__metadata__"]["epoch"])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} is corrupt ({error})") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            key = f"momentum.{names[id(param)]}"
            if key in tensors:
                optimizer.state[param]["momentum_buffer"] = tensors[key].to(param.device)
    return epoch
