"""Typed training configuration: TOML files validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the valid keys instead of a setting
that is silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cascade import Threshold


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# CIFAR-10 statistics: the reference uses them for CIFAR-100-LT too (../shared/REFERENCE-RIDE.md 1.3, trap 3).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class DataConfig(_Section):
    dataset: Literal["cifar10", "cifar100", "folder"] = "cifar10"
    root: str | None = Field(None, description="Dataset folder; --data-dir overrides it.")
    imbalance_profile: Literal["exp", "step", "none"] = "exp"
    imbalance_factor: float = Field(100.0, ge=1.0, description="Largest class count / smallest class count.")
    subset_seed: int = Field(0, description="Seed of the legacy NumPy RandomState that picks the kept images.")
    image_size: int = Field(32, ge=8)
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    crop_padding: int = Field(4, ge=0)
    hflip: bool = True
    rotation_degrees: float = Field(15.0, ge=0.0, le=180.0, description="0 disables the random rotation.")
    many_shot_above: int = Field(100, description="Classes with more training images than this are many-shot.")
    few_shot_below: int = Field(20, description="Classes with fewer training images than this are few-shot.")
    val_per_class: int = Field(
        0, ge=0, description="Images per class held out of training as a validation split (for stage 2 thresholds)."
    )
    cache_dir: str | None = Field(None, description="Where decoded images are cached; default ~/.cache/ride-serve.")


class ModelConfig(_Section):
    arch: Literal["ride_resnet32", "resnet32", "ride_resnet10", "ride_resnet50", "ride_resnext50"] = "ride_resnet32"
    num_experts: int = Field(3, ge=1, le=8)
    reduce_dimension: bool = True
    share_stage2: bool = Field(False, description="CIFAR ResNet-32 only: share stage 2 as well as stem + stage 1.")
    classifier: Literal["cosine", "linear"] = "cosine"
    scale: float = Field(30.0, gt=0.0, description="Cosine classifier scale s (ignored by the linear classifier).")

    @model_validator(mode="after")
    def _plain_resnet_has_one_expert(self) -> ModelConfig:
        if self.arch == "resnet32" and self.num_experts != 1:
            raise ValueError("arch 'resnet32' is the one-expert baseline: set num_experts = 1")
        return self


class LossConfig(_Section):
    kind: Literal["ce", "focal", "ldam", "ride"] = "ride"
    base: Literal["ce", "ldam"] = Field("ldam", description="Per-expert classification loss inside the RIDE loss.")
    max_margin: float = Field(0.5, gt=0.0, description="LDAM: largest per-class margin (cosine units).")
    focal_gamma: float = Field(1.0, ge=0.0)
    drw: bool = Field(True, description="Deferred re-weighting with effective-number class weights.")
    drw_beta: float = Field(0.9999, gt=0.0, lt=1.0)
    drw_epoch: int | None = Field(None, description="DRW and temperatures from the epoch after this (1-based).")
    diversity_factor: float = Field(-0.45, description="lambda of the diversity term; negative increases diversity.")
    diversity_temperature: float = Field(1.0, gt=0.0, description="eta, the base temperature.")
    reweight_factor: float = Field(0.05, ge=0.0, le=1.0, description="gamma of the per-class temperature vector.")
    collaborative: bool = Field(False, description="Classify the mean logits instead of each expert's logits.")


class OptimConfig(_Section):
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    batch_size: int = Field(128, ge=1)


class ScheduleConfig(_Section):
    epochs: int = Field(200, ge=1)
    warmup_epochs: int | None = Field(None, ge=0, description="Linear warm-up; default 5 at 200 epochs, scaled.")
    milestones: list[int] | None = Field(None, description="1-based epochs after which lr drops; default [160, 180].")
    decay_factors: list[float] = Field([0.01, 0.0001], description="lr multiplier after each milestone.")

    @model_validator(mode="after")
    def _milestones_match_factors(self) -> ScheduleConfig:
        if self.milestones is not None and len(self.milestones) != len(self.decay_factors):
            raise ValueError("milestones and decay_factors must have the same length")
        return self


class RuntimeConfig(_Section):
    """How a run executes. None of these keys changes what is trained, so a run may resume with other values."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training compute precision. 'bf16' is autocast with the classifier heads and the loss in fp32; "
        "'auto' picks it where the hardware runs bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), "
        "fp32 elsewhere. Evaluation always runs in fp32.",
    )
    channels_last: bool = Field(True, description="NHWC memory layout for the convolutions (faster in oneDNN/cuDNN).")
    compile: bool = Field(
        False,
        description="torch.compile (inductor, static shapes: one graph for the full batch, one for the epoch's "
        "last) the training forward; minutes of warm-up, pays off on long runs.",
    )
    fused_optimizer: bool = Field(True, description="Fused SGD step (one kernel over all parameters).")
    checkpoint_every: int = Field(2, ge=1, description="Save a resumable state every N epochs.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; default: physical cores.")
    eval_batch_size: int = Field(
        512, ge=1, description="Evaluation batch (no gradients kept); larger batches measured slower on CPU caches."
    )
    log_every: int = Field(
        10,
        ge=0,
        description="Training steps between progress-bar updates, each of which reads the running loss back to "
        "the host (a GPU sync); 0: only at the end of each epoch.",
    )
    sync_batchnorm: bool = Field(
        False,
        description="Under torchrun on GPUs, batch-norm statistics over the global batch (SyncBatchNorm) instead "
        "of each process's share. CUDA only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_amp(cls, data: Any) -> Any:
        # Checkpoints written before `precision` existed store `amp` (CUDA-only bf16 autocast).
        if isinstance(data, dict) and "amp" in data:
            data = dict(data)
            amp = data.pop("amp")
            data.setdefault("precision", "bf16" if amp else "fp32")
        return data


class RouterConfig(_Section):
    top_z: int | None = Field(None, ge=1, description="Top-z mean logits fed to each router; default min(30, C).")
    hidden: int = Field(16, ge=1)
    pos_weight: float = Field(100.0, gt=0.0)
    epochs: int = Field(5, ge=1)
    lr: float = Field(0.01, gt=0.0)
    batch_size: int = Field(512, ge=1)
    weight_decay: float = Field(5e-4, ge=0.0)
    threshold: Threshold = 0.5


class DistillConfig(_Section):
    temperature: float = Field(1.5, gt=0.0)
    factor: float = Field(1.0, ge=0.0)


class TrainConfig(_Section):
    name: str = "ride"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    router: RouterConfig = RouterConfig()
    distill: DistillConfig = DistillConfig()


def _valid_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return sorted(model.model_fields)


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = ", ".join(_valid_keys(TrainConfig, item["loc"][:-1]))
            lines.append(f"  unknown key '{where}'; valid keys here: {valid}")
        else:
            lines.append(f"  {where or '(top level)'}: {item['msg']}")
    return ConfigError("\n".join(lines))


def parse_value(text: str) -> Any:
    """Read a --set value as TOML (numbers, booleans, lists, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dictionary (copy-on-write)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (for example optim.lr=0.05), got '{item}'")
        parts = key.strip().split(".")
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(value.strip())
    return merged


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, source) from None


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return config_from_dict(apply_overrides(raw, list(overrides)), source)


# Keys a resumed run may change: where and how fast it runs, and where its data lives. Everything else (data
# selection, model, loss, optimiser, schedule, seed) decides what is trained, so it must match the interrupted run.
RESUMABLE_CHANGES = (
    "runtime.device",
    "runtime.precision",
    "runtime.channels_last",
    "runtime.compile",
    "runtime.fused_optimizer",
    "runtime.checkpoint_every",
    "runtime.num_threads",
    "runtime.eval_batch_size",
    "runtime.log_every",
    "runtime.sync_batchnorm",
    "data.root",
    "data.cache_dir",
)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def require_same_recipe(original: TrainConfig, new: TrainConfig, *, where: str) -> None:
    """Refuse to continue the run ``where`` with a config that changes what it trains, naming every changed key.

    Only the keys in RESUMABLE_CHANGES (how and where it runs) may differ.
    """
    changed = config_differences(original, new, ignore=RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            f"{where}: the config differs from the one the run started with, in " + "; ".join(changed) + ". Use the "
            "original config (only runtime settings and data paths may change), or another --out folder"
        )


def config_differences(original: TrainConfig, new: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: original -> new`` for every dotted key whose value differs, except the ``ignore`` keys."""
    before, after = _flatten(original.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in ignore and before.get(key) != after.get(key)
    ]
