"""Shared test fixtures: where the real CIFAR-10 image folder lives (``../shared`` beside the repo), a tiny
trained RIDE checkpoint (stage 1, and with routers) built from a few hundred of its real JPEGs, the routed one
with routers shifted so that the cascade really exits early, the model folder the real exporter makes of it,
and that folder's graphs converted to float16."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# The repo root's sibling `shared/` holds the real data; RIDE_CIFAR10_DIR points elsewhere when it lives apart.
CIFAR10_DIR = Path(
    os.environ.get("RIDE_CIFAR10_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10")
)

# The tiny long-tailed set: 40 training images per class before the exp profile with factor 10 keeps
# 40, 30, 23, 18, 14, 11, 8, 6, 5, 4 (159 images); 3 per class are held out as the validation split, leaving
# 37, 27, 20, 15, 11, 8, 5, 3, 2, 1 for training; 10 test images per class.
TINY_TRAIN_PER_CLASS = 40
TINY_TEST_PER_CLASS = 10


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "train").is_dir():
        pytest.skip(f"real CIFAR-10 image folder not found at {CIFAR10_DIR} (set RIDE_CIFAR10_DIR)")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def tiny_data_dir(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of real CIFAR-10 JPEGs (symlinks): 40 training and 10 test images per class."""
    root = tmp_path_factory.mktemp("tiny-cifar10")
    for split, count in (("train", TINY_TRAIN_PER_CLASS), ("test", TINY_TEST_PER_CLASS)):
        for source_class in sorted(p for p in (cifar10_dir / split).iterdir() if p.is_dir()):
            target = root / split / source_class.name
            target.mkdir(parents=True)
            for source in sorted(source_class.iterdir())[:count]:
                (target / source.name).symlink_to(source)
    return root


def tiny_config_dict(data_dir: Path, cache_dir: Path) -> dict:
    """The raw config of the tiny run: 3-expert RIDE ResNet-32, imbalance 10, 3 validation images per class,
    groups many > 15 / few < 5 so that all three are populated, 1 epoch of stage 1 and 1 of stage 2 (the models
    are barely trained: the fixtures exercise mechanics, not accuracy)."""
    return {
        "name": "tiny",
        "data": {
            "dataset": "folder",
            "root": str(data_dir),
            "cache_dir": str(cache_dir),
            "imbalance_factor": 10,
            "val_per_class": 3,
            "many_shot_above": 15,
            "few_shot_below": 5,
        },
        "model": {"arch": "ride_resnet32", "num_experts": 3},
        "optim": {"batch_size": 32},
        "schedule": {"epochs": 1},
        # fp32 NCHW on every machine, so the tiny model is the same whether or not the CPU has native bf16. One
        # thread (see `one_torch_thread`): training sets its own thread count, all physical cores by default.
        "runtime": {
            "seed": 0,
            "device": "cpu",
            "checkpoint_every": 100,
            "precision": "fp32",
            "channels_last": False,
            "num_threads": 1,
        },
        "router": {"epochs": 1, "batch_size": 64},
    }


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the previous count.

    On a small box whose cores other jobs keep busy, two OpenMP threads waiting on each other made these
    small-batch workloads about ten times slower than one thread (measured: 190 s against 18 s for the route and
    distill tests on 2 shared cores); on an idle box one thread costs about a third more.

    Training sets its own count (``runtime.num_threads``, all physical cores by default), so the tests' training
    configs say ``num_threads = 1`` as well: with two, an epoch of the tiny run took five times the CPU seconds.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def interrupted_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Iterator[None]:
    """Inside the block, stage-1 training stops with KeyboardInterrupt when ``epoch`` starts (as Ctrl-C would),
    after saving what came before; the block must raise it. Training runs normally again afterwards."""
    from training import train as train_module

    real_epoch = train_module.train_one_epoch

    def interrupted(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a whole test module (see :func:`one_torch_thread`); use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete stage-1 checkpoint folder (3 experts, 1 epoch on the tiny set). Treat it as read-only: copy
    it (``shutil.copytree``) before anything that writes into it, e.g. ``evaluate``."""
    from training.config import config_from_dict
    from training.train import train

    base = tmp_path_factory.mktemp("tiny-checkpoint")
    cfg = config_from_dict(tiny_config_dict(tiny_data_dir, base / "cache"))
    with one_torch_thread():
        return train(cfg, out=base / "stage1")


@pytest.fixture(scope="session")
def tiny_routed_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` with routers (stage 2, 1 epoch), stored threshold 0.5 (the default). Read-only like
    ``tiny_checkpoint``.

    The routers are barely trained and their logits are large (about 10 to 20 on the test images), so at 0.5
    almost every image runs all experts; to exercise early exit, pick a threshold from the router probabilities
    or use ``early_exit_checkpoint``."""
    from training.route import route_checkpoint

    out = tmp_path_factory.mktemp("tiny-routed") / "routed"
    with one_torch_thread():
        return route_checkpoint(tiny_checkpoint, out=out, progress=False)


# Early exit: the tiny routers' logits are about 10 to 20 on real images, so at threshold 0.5 nearly every image
# runs all experts. Centred on these real test images (4 per class, apart from the first few per class that the
# service tests send), each router stops about half the rows that reach it.
CALIBRATION_IMAGES = slice(100, 104)


def _median_router_logit(routers, k: int, outputs) -> float:
    """Router k's (1-based) median logit on ``outputs``."""
    import torch

    with torch.no_grad():
        mean = outputs.logits[:, :k].mean(dim=1)
        return routers(k, mean, outputs.features[:, k - 1]).median().item()


def centre_routers(routers, outputs, target: float) -> None:
    """Shift ``routers`` (a ``training.models.router.Routers``) so that each one's median logit on ``outputs``
    (the stage-1 model's ``ExpertOutputs`` on some images) is ``target``.

    Router 1 moves with the shared output bias. The later routers share that bias, so each is moved through its
    own hidden layer instead: shifting hidden unit j's bias by ``s * sign(w_j)`` (w = the output weight of unit
    j) raises the router's logit monotonically in ``s``, so bisection finds the shift.
    """
    import torch

    with torch.no_grad():
        routers.fc.bias -= _median_router_logit(routers, 1, outputs) - target
        direction = torch.sign(routers.fc.weight[0, routers.top_z :])
        for k in range(2, routers.num_experts):
            bias = routers.hidden_fcs[k - 1].bias
            start = bias.clone()
            low, high = -100.0, 100.0
            for _ in range(40):
                middle = (low + high) / 2
                bias.copy_(start + middle * direction)
                low, high = (middle, high) if _median_router_logit(routers, k, outputs) < target else (low, middle)


@pytest.fixture(scope="session")
def early_exit_checkpoint(
    tiny_routed_checkpoint: Path, cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``tiny_routed_checkpoint`` with its routers shifted so that each one's median logit on 40 real test
    images is logit(0.5) = 0: at the stored threshold 0.5 the cascade really mixes 1, 2 and 3 experts. Its
    metrics are those of ``python -m training.run evaluate`` on the shifted routers. Read-only."""
    import torch

    from export.graphs import load_source
    from export.verify import normalized
    from training.checkpoint import load_checkpoint, router_state, save_checkpoint
    from training.data.folder import decode_images
    from training.evaluate_checkpoint import evaluate_checkpoint

    base = tmp_path_factory.mktemp("early-exit")
    source = load_source(tiny_routed_checkpoint)
    test = cifar10_dir / "test"
    files = [f"{c.name}/{p.name}" for c in sorted(test.iterdir()) for p in sorted(c.iterdir())[CALIBRATION_IMAGES]]
    size = source.meta.input.image_size
    images = decode_images(test, files, size, split="calibration", cache_dir=base / "cache")
    with one_torch_thread(), torch.no_grad():
        outputs = source.model(normalized(images, source.meta))
        centre_routers(source.routers, outputs, target=0.0)
    meta, weights = load_checkpoint(tiny_routed_checkpoint)
    weights.update(router_state(source.routers))
    folder = base / "checkpoint"
    save_checkpoint(folder, weights, meta)
    with one_torch_thread():
        evaluate_checkpoint(folder, device_choice="cpu")  # the routed metrics of the shifted routers
    return folder


@pytest.fixture(scope="session")
def early_exit_model_dir(
    early_exit_checkpoint: Path, cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``early_exit_checkpoint`` exported by the real exporter (float32, opset 18, verified on 128 real test
    images, with their early exits) into a model folder named ``tiny-early-exit``. Read-only: copy it before
    changing anything."""
    from export.build import export_checkpoint

    out = tmp_path_factory.mktemp("exported-early-exit") / "tiny-early-exit"
    with one_torch_thread():
        return export_checkpoint(early_exit_checkpoint, out, data_dir=cifar10_dir, num_images=128).folder


@pytest.fixture(scope="session")
def early_exit_fp16_model_dir(early_exit_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``early_exit_model_dir`` with every graph converted to float16 weights, inputs and outputs by the
    exporter's own converter (`export.graphs.convert_to_float16`), and a manifest that says so: the same weights
    in half precision, without a second export. The ``--fp16`` export itself, parity included, is tested in
    tests/export/test_build.py."""
    import shutil

    from export.graphs import convert_to_float16, read_graph_io
    from export.manifest import load_manifest, sha256_file, write_manifest

    manifest = load_manifest(early_exit_model_dir)
    folder = tmp_path_factory.mktemp("early-exit-fp16") / "tiny-early-exit-fp16"
    folder.mkdir()
    specs = []
    for spec in manifest.graph_specs():
        path = Path(shutil.copy(early_exit_model_dir / spec.file, folder / spec.file))
        convert_to_float16(path)
        io = read_graph_io(path)
        specs.append(spec.model_copy(update={"sha256": sha256_file(path), "inputs": io.inputs, "outputs": io.outputs}))
    experts = manifest.cascade.num_experts
    graphs = manifest.graphs.model_copy(
        update={"trunk": specs[0], "experts": specs[1 : 1 + experts], "routers": specs[1 + experts :]}
    )
    half = manifest.model_copy(
        update={
            "precision": "float16",
            "input": manifest.input.model_copy(update={"dtype": "float16"}),
            "graphs": graphs,
        }
    )
    write_manifest(half, folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(early_exit_model_dir: Path) -> Path:
    """The model folder the service and deployment tests serve: ``early_exit_model_dir``."""
    return early_exit_model_dir


@pytest.fixture(scope="session")
def early_exit_int8_model_dir(early_exit_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``early_exit_checkpoint`` exported with ``--int8`` by the real exporter into ``tiny-early-exit-int8``: the
    float32 graphs verified against PyTorch, then quantized (calibrated on the tiny run's 129 training images)
    and gated on its validation split (30 images). The tiny model is barely trained, so the gate's bound is
    opened to 100 points: these fixtures exercise the mechanics; the gate's rule is tested on its own. Read-only."""
    from export.build import export_checkpoint

    out = tmp_path_factory.mktemp("exported-int8") / "tiny-early-exit-int8"
    with one_torch_thread():
        return export_checkpoint(
            early_exit_checkpoint, out, int8=True, num_images=64, max_accuracy_drop_points=100.0
        ).folder
