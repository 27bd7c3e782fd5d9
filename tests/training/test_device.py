"""Training, routing and distillation on a device other than the CPU, simulated here (tests/training/
device_simulation.py): no op mixes the device with the CPU, the statistics are reduced on the device whatever
the backend, a step never copies between the host and the device (the copies of an epoch do not grow with its
steps), and a process that gets no image of the last batch under DDP no longer logs NaN."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from tests.training.device_simulation import DEVICE, SimulatedDevice
from training import route_train, runtime
from training import train as train_module
from training.config import ConfigError, TrainConfig, config_from_dict
from training.data import BatchAugment, ImageSet
from training.distill import Teacher
from training.evaluate import predict
from training.losses import build_loss
from training.models import RIDEModel, build_model
from training.models.router import Routers
from training.runtime import Runtime, all_reduce_sum
from training.train import train_one_epoch, training_forward

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
BATCH = 8


def _config(**runtime_settings: object) -> TrainConfig:
    return config_from_dict(
        {
            "model": {"arch": "ride_resnet32", "num_experts": 3},
            "optim": {"batch_size": BATCH},
            "router": {"batch_size": BATCH, "epochs": 1},
            # The meta device has no fused optimizer kernels and no autocast: the simulation runs the fp32 path.
            "runtime": {"precision": "fp32", "fused_optimizer": False, **runtime_settings},
        }
    )


@pytest.fixture
def generators_on_the_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.device]]:
    """The meta device has no random generator: the code gets a CPU one, once it has asked for one on the device
    (CUDA would refuse a CPU generator for a CUDA op; the simulation cannot check that part)."""
    asked: list[torch.device] = []

    def stand_in(device: torch.device, seed: int) -> torch.Generator:
        asked.append(device)
        return torch.Generator().manual_seed(seed)

    monkeypatch.setattr(train_module, "augment_generator", stand_in)
    monkeypatch.setattr(route_train, "augment_generator", stand_in)
    yield asked
    assert asked and all(device == DEVICE for device in asked), asked


def _images(count: int, device: torch.device) -> ImageSet:
    images = torch.zeros(count, 3, 32, 32, dtype=torch.uint8)
    return ImageSet(images.to(device), (torch.arange(count) % NUM_CLASSES).to(device))


def _model(cfg: TrainConfig, num_experts: int | None = None) -> RIDEModel:
    settings = cfg.model if num_experts is None else cfg.model.model_copy(update={"num_experts": num_experts})
    return build_model(settings, NUM_CLASSES).to(DEVICE, memory_format=torch.channels_last)


def _epoch(
    cfg: TrainConfig, num_images: int, *, rt: Runtime | None = None, teacher: Teacher | None = None
) -> SimulatedDevice:
    """One stage-1 epoch on the simulated device; returns the simulation with its copy counts."""
    model = _model(cfg)
    loss_fn = build_loss(cfg.loss, [num_images // NUM_CLASSES] * NUM_CLASSES, 30.0, drw_epoch=0).to(DEVICE)
    loss_fn.set_epoch(1)  # DRW on: the class weights take part in every step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=False)
    train_set = _images(num_images, DEVICE)
    with SimulatedDevice() as device:
        train_one_epoch(
            model,
            loss_fn,
            optimizer,
            train_set,
            BatchAugment.from_config(cfg.data),
            cfg=cfg,
            epoch=1,
            runtime=rt or Runtime(DEVICE),
            progress=False,
            teacher=teacher,
        )
    return device


@pytest.mark.usefixtures("generators_on_the_device")
def test_training_steps_stay_on_the_device() -> None:
    cfg = _config()
    # 2 steps (the second a short one) and 5 steps: the copies of an epoch do not depend on its steps.
    short, longer = _epoch(cfg, BATCH + 3), _epoch(cfg, 4 * BATCH + 3)
    assert short.to_host == longer.to_host == 1  # the epoch's statistics, once
    assert short.to_device == longer.to_device  # the epoch's order, normalisation constants
    assert longer.to_device <= 3


@pytest.mark.usefixtures("generators_on_the_device")
def test_distillation_steps_stay_on_the_device() -> None:
    cfg = _config()
    teacher_model = _model(cfg, num_experts=4).eval().requires_grad_(False)
    teacher = Teacher(teacher_model, meta=None, folder=None, sha256="", temperature=1.5, factor=1.0)  # type: ignore[arg-type]
    short, longer = _epoch(cfg, BATCH + 3, teacher=teacher), _epoch(cfg, 4 * BATCH + 3, teacher=teacher)
    assert short.syncs == longer.syncs


@pytest.mark.usefixtures("generators_on_the_device")
def test_router_steps_stay_on_the_device() -> None:
    cfg = _config()
    copies = []
    for num_images in (BATCH + 3, 4 * BATCH + 3):
        model = _model(cfg)
        routers = Routers(3, NUM_CLASSES, model.feature_dim, top_z=5).to(DEVICE)
        host_set = _images(num_images, torch.device("cpu"))
        with SimulatedDevice() as device:
            log = route_train.train_routers(model, routers, host_set, cfg, device=DEVICE, progress=False)
        assert log[0]["images"] == 1  # what the simulation reads back (ones): the record was made from it
        copies.append((device.to_host, device.to_device))
    assert copies[0] == copies[1]
    assert copies[0][0] == 1  # the epoch's statistics


def test_evaluation_copies_its_outputs_back_once() -> None:
    model = _model(_config())
    images = torch.zeros(3 * BATCH + 1, 3, 32, 32, dtype=torch.uint8)
    with SimulatedDevice() as device:
        outputs = predict(model, images, mean=(0.5,) * 3, std=(0.2,) * 3, device=DEVICE, batch_size=BATCH)
    assert outputs.logits.shape == (3 * BATCH + 1, 3, NUM_CLASSES) and outputs.logits.device.type == "cpu"
    assert device.to_host == 2  # logits and features, each once
    assert device.to_device == 4 + 2  # the 4 image batches (from wherever the caller holds them), mean and std


@pytest.mark.usefixtures("generators_on_the_device")
def test_distributed_statistics_are_reduced_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    reduced: list[torch.device] = []
    # NCCL is not here: the collective records what it was given (gloo runs for real in test_train's DDP test).
    monkeypatch.setattr(runtime.dist, "all_reduce", lambda values: reduced.append(values.device))
    _epoch(_config(), 2 * BATCH, rt=Runtime(DEVICE, rank=1, world_size=2))
    assert reduced == [DEVICE]


def test_statistics_off_the_training_device_are_refused_whatever_the_backend() -> None:
    # The rule NCCL enforces on GPUs, checked before any backend sees the tensor: gloo on the CPU would accept it.
    gpu_run = Runtime(torch.device("cuda", 0), rank=0, world_size=2)
    with pytest.raises(ValueError, match="reduce on the training device cuda:0, not on cpu"):
        all_reduce_sum(torch.zeros(3, dtype=torch.float64), gpu_run)


def test_a_process_left_without_images_by_the_last_batch_logs_no_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 2, a last global batch of one image: it is skipped by both processes (both see the same order),
    instead of giving process 1 an empty batch, a NaN loss and a zero gradient to average in."""
    monkeypatch.setattr(runtime.dist, "all_reduce", lambda values: None)  # this process stands for rank 1
    cpu = torch.device("cpu")
    cfg = _config(device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    loss_fn = build_loss(cfg.loss, [3] * NUM_CLASSES, 30.0, drw_epoch=0)
    loss_fn.set_epoch(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * BATCH + 1, 3, 32, 32), dtype=torch.uint8, generator=generator)
    train_set = ImageSet(images, torch.arange(2 * BATCH + 1) % NUM_CLASSES)
    stats = train_one_epoch(
        model,
        loss_fn,
        optimizer,
        train_set,
        BatchAugment.from_config(cfg.data),
        cfg=cfg,
        epoch=1,
        runtime=Runtime(cpu, rank=1, world_size=2),
        progress=False,
    )
    assert math.isfinite(stats.loss) and stats.images == BATCH  # half of each of the two full batches


def test_sync_batchnorm_is_refused_off_cuda() -> None:
    cfg = _config(device="cpu", sync_batchnorm=True)
    model = build_model(cfg.model, NUM_CLASSES)
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        training_forward(model, cfg.runtime, Runtime(torch.device("cpu")))
    # Without it the training forward is the model itself (no DDP, no compile asked for).
    assert training_forward(model, _config(device="cpu").runtime, Runtime(torch.device("cpu"))) is model
