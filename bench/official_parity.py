"""Step-level parity with the official RIDE code: same weights and batch give the same loss and gradients.

Why this and not only a training run side by side: at the 20-epoch schedule, a run's test accuracy moves by
several points from randomness alone. The official run's own epoch-16 weights (after 16 epochs at lr 0.1) score
30 % on the test split, and our trainer continuing from them for the last 4 epochs (different batch order and
augmentation) ended 2 points away from the official run's epoch 20. So a few points between two single runs
proves nothing either way. This check takes the randomness out: both sides start every comparison from the same
weights and see the same augmented batch, so any difference is a difference in the code (model, LDAM margins,
DRW weights, diversity temperatures, backward, SGD step), not in luck.

It compares, for our RIDE-4 ResNet-32 and the official ``ResNet_s`` + ``RIDELoss`` (loaded from a checkout,
never copied):
- at several weight states (the initialisation, then after more and more of our training steps at lr 0.1), with
  DRW and the diversity temperatures off and on: the loss, and every parameter's gradient (relative L2 error);
- one SGD step (momentum, Nesterov, weight decay) from the same momentum state: the largest weight difference.
Exit status 1 when a relative difference exceeds ``--tolerance``.

    python bench/official_parity.py --official PATH [--steps 30] [--tolerance 1e-4]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from official_code import official_cifar_model, official_ride_loss
from torch import nn

from training.config import TrainConfig, load_config
from training.data import BatchAugment, LongTailData, iterate_batches, load_data
from training.losses import ExpertLoss, build_loss
from training.models import RIDEModel, build_model
from training.official.keys import CIFAR_LAYOUT, Naming
from training.schedule import drw_epoch, resolve_schedule
from training.train import logit_scale

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Comparison:
    state: str
    drw: bool
    loss_rel: float
    grad_rel: float
    worst_param: str


def copy_into_official(ours: RIDEModel, official: nn.Module, num_experts: int) -> None:
    naming = Naming(CIFAR_LAYOUT, num_experts)
    official.load_state_dict({naming.to_official(k): v for k, v in ours.state_dict().items()}, strict=True)


def sgd(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
        foreach=False,
    )


def official_loss_value(official: nn.Module, criterion: nn.Module, images: torch.Tensor, targets: torch.Tensor):
    output = official(images)
    # As the official trainer passes them: the mean logits, and each expert's logits in extra_info.
    return criterion(output_logits=output, target=targets, extra_info={"logits": official.logits})


def compare(
    ours: RIDEModel,
    official: nn.Module,
    our_loss: ExpertLoss,
    official_criterion: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    naming: Naming,
) -> tuple[float, float, str]:
    """Relative loss difference, worst relative gradient difference and its parameter, at the current weights."""
    ours.zero_grad()
    official.zero_grad()
    mine = our_loss(ours(images).logits.float(), targets)
    mine.backward()
    theirs = official_loss_value(official, official_criterion, images, targets)
    theirs.backward()
    worst, worst_name = 0.0, ""
    our_params = dict(ours.named_parameters())
    for name, param in official.named_parameters():
        grad = our_params[naming.to_ours(name)].grad
        rel = ((param.grad - grad).norm() / param.grad.norm().clamp_min(1e-30)).item()
        if rel > worst:
            worst, worst_name = rel, name
    return abs(mine.item() - theirs.item()) / abs(theirs.item()), worst, worst_name


def sgd_step_difference(ours: RIDEModel, official: nn.Module, cfg: TrainConfig, naming: Naming) -> float:
    """Both optimizers step once from zero momentum on the gradients already computed; worst |Δw| / max |w|."""
    sgd(list(ours.parameters()), cfg, cfg.optim.lr).step()
    sgd(list(official.parameters()), cfg, cfg.optim.lr).step()
    our_params = dict(ours.named_parameters())
    worst = 0.0
    for name, param in official.named_parameters():
        mine = our_params[naming.to_ours(name)].detach()
        worst = max(worst, ((param.detach() - mine).abs().max() / mine.abs().max().clamp_min(1e-30)).item())
    return worst


def run(checkout: Path, cfg: TrainConfig, data: LongTailData, steps: int) -> tuple[list[Comparison], float]:
    schedule = resolve_schedule(cfg.schedule)
    first_drw_epoch = drw_epoch(cfg.loss, schedule)
    naming = Naming(CIFAR_LAYOUT, cfg.model.num_experts)
    torch.manual_seed(0)
    ours = build_model(cfg.model, data.num_classes).train()
    official = official_cifar_model(checkout, cfg, data.num_classes).train()
    our_loss = build_loss(cfg.loss, data.class_counts, logit_scale(cfg), first_drw_epoch)
    official_criterion = official_ride_loss(checkout, cfg, data.class_counts, first_drw_epoch)
    augment = BatchAugment.from_config(cfg.data)
    generator = torch.Generator().manual_seed(0)
    batches = iterate_batches(len(data.train.labels), cfg.optim.batch_size, shuffle=True, seed=0, epoch=1)
    train_opt = sgd(list(ours.parameters()), cfg, cfg.optim.lr)
    checkpoints = sorted({0, steps // 3, steps})
    results: list[Comparison] = []
    step_diff = 0.0
    for step in range(steps + 1):
        indices = next(batches)
        images, targets = augment(data.train.images[indices], generator), data.train.labels[indices]
        if step in checkpoints:
            for drw in (False, True):
                epoch = first_drw_epoch + 1 if drw else 1
                our_loss.set_epoch(epoch)
                official_criterion._hook_before_epoch(epoch)
                # BatchNorm running statistics are buffers: copying them too keeps both models identical.
                copy_into_official(ours, official, cfg.model.num_experts)
                loss_rel, grad_rel, worst = compare(
                    ours, official, our_loss, official_criterion, images, targets, naming
                )
                results.append(Comparison(f"after {step} steps", drw, loss_rel, grad_rel, worst))
            if step == checkpoints[-1]:
                saved = {k: v.clone() for k, v in ours.state_dict().items()}
                step_diff = sgd_step_difference(ours, official, cfg, naming)
                ours.load_state_dict(saved)
                break
        our_loss.set_epoch(1)
        train_opt.zero_grad()
        our_loss(ours(images).logits.float(), targets).backward()
        train_opt.step()
    return results, step_diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official",
        type=Path,
        default=os.environ.get("RIDE_OFFICIAL_DIR"),
        help="checkout of frank-xwang/RIDE-LongTailRecognition (outside this repo)",
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cifar10_lt_ride4.toml")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--steps", type=int, default=30, help="our training steps before the last comparison")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    args = parser.parse_args()
    if args.official is None:
        print("skipped: no checkout of the official code given (--official PATH or RIDE_OFFICIAL_DIR)")
        return 0
    torch.set_num_threads(1)  # one thread: both sides then sum in the same order as far as torch allows
    cfg = load_config(args.config, [f'data.root="{args.data_dir}"', "data.val_per_class=0"])
    data = load_data(cfg.data, args.data_dir, progress=False)
    try:
        results, step_diff = run(args.official, cfg, data, args.steps)
    except (OSError, ImportError, AttributeError, TypeError, RuntimeError) as error:
        print(f"skipped: {args.official} did not give the official model and loss ({type(error).__name__}: {error})")
        return 0
    print(
        f"{cfg.model.arch} x{cfg.model.num_experts} (reduced width: {cfg.model.reduce_dimension}), batch "
        f"{cfg.optim.batch_size}, {len(data.train.labels)} training images; ours vs the official code at the same "
        "weights and batch"
    )
    print(f"  {'weights':<18} {'DRW':<4} {'loss rel. diff':>15} {'worst grad rel. diff':>21}  parameter")
    for r in results:
        print(f"  {r.state:<18} {'on' if r.drw else 'off':<4} {r.loss_rel:15.1e} {r.grad_rel:21.1e}  {r.worst_param}")
    print(f"  one SGD step from the last state: largest weight difference {step_diff:.1e} of the largest weight")
    worst = max([r.loss_rel for r in results] + [r.grad_rel for r in results] + [step_diff])
    verdict = "PARITY" if worst <= args.tolerance else "DIFFERENT"
    print(f"{verdict}: largest relative difference {worst:.1e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
