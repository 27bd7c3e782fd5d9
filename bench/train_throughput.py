"""Training throughput of RIDE-4 ResNet-32 at batch 128: real data pipeline vs a pre-made tensor batch.

The real pipeline is what `training.train` does per step: gather uint8 images by index, augment them on the
batch (crop, flip, rotation, normalisation), then forward / backward / SGD step. The baseline repeats the step on
one pre-made normalised batch. Both run interleaved in rounds in one process, so machine noise hits both alike;
the figure that matters is the ratio (goal: the data pipeline adds at most 10 %).

    python bench/train_throughput.py [--data-dir ../shared/data/cifar10] [--rounds 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from training.config import TrainConfig, load_config
from training.data import BatchAugment, iterate_batches, load_data, normalize
from training.losses import build_loss
from training.models import build_model
from training.train import logit_scale

REPO = Path(__file__).resolve().parents[1]


def make_step(cfg: TrainConfig, class_counts: list[int]):
    torch.manual_seed(0)
    model = build_model(cfg.model, len(class_counts)).train()
    loss_fn = build_loss(cfg.loss, class_counts, logit_scale(cfg), drw_epoch=160)
    loss_fn.set_epoch(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        loss = loss_fn(model(images).logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    args = parser.parse_args()

    cfg = load_config(REPO / "configs" / "cifar10_lt_ride4.toml", ["data.dataset=folder"])
    data = load_data(cfg.data, args.data_dir)
    step = make_step(cfg, data.class_counts)
    augment = BatchAugment.from_config(cfg.data)
    batch = cfg.optim.batch_size
    fixed_images = normalize(data.train.images[:batch], cfg.data.mean, cfg.data.std)
    fixed_targets = data.train.labels[:batch]
    generator = torch.Generator().manual_seed(0)
    batches = iterate_batches(len(data.train), batch, shuffle=True, seed=0, epoch=1, drop_last=True)

    def real_step() -> None:
        indices = next(batches)
        step(augment(data.train.images[indices], generator), data.train.labels[indices])

    for _ in range(2):  # warm-up: allocator, oneDNN kernels
        real_step()
        step(fixed_images, fixed_targets)
    rates: dict[str, list[float]] = {"real pipeline": [], "pre-made batch": []}
    for _ in range(args.rounds):
        for name, run in (("real pipeline", real_step), ("pre-made batch", lambda: step(fixed_images, fixed_targets))):
            started = time.perf_counter()
            for _ in range(args.steps):
                run()
            rates[name].append(args.steps * batch / (time.perf_counter() - started))
    print(f"RIDE-4 ResNet-32, batch {batch}, {torch.get_num_threads()} threads, {args.rounds}x{args.steps} steps each")
    for name, values in rates.items():
        spread = f"min {min(values):.1f}, max {max(values):.1f}"
        print(f"  {name:<15} {statistics.median(values):7.1f} images/s (median; {spread})")
    ratio = statistics.median(rates["real pipeline"]) / statistics.median(rates["pre-made batch"])
    print(f"  real / pre-made = {ratio:.3f}  (pipeline overhead {100 * (1 - ratio):.1f} %; goal <= 10 %)")


if __name__ == "__main__":
    main()
