"""Stage 2 (routers), the routed evaluation and the accuracy-compute curve, on hand-made logits and on the tiny
real checkpoint (``tiny_checkpoint`` / ``tiny_routed_checkpoint`` in tests/conftest.py)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascade import continues, sigmoid
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_meta,
    model_from_checkpoint,
    routers_from_checkpoint,
    save_checkpoint,
    save_meta,
    weights_sha256,
)
from training.config import ConfigError, ModelConfig
from training.curve import CURVE_CSV, CURVE_PNG, CurvePoint, read_curve_csv
from training.data import ImageSet, load_data, normalize
from training.evaluate import ExpertOutputs, predict
from training.macs import cascade_cost
from training.models import RIDEModel, build_model
from training.models.router import Routers
from training.replay import ReplayGraphs
from training.report import METRICS_FILE
from training.route import route_checkpoint
from training.route_plan import DEFAULT_VAL_PER_CLASS, resolve_route_config
from training.route_train import cosine_lr, router_targets, routing_loss, train_routers
from training.run import main
from training.threshold import choose_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------------------
# Targets and loss on hand-made logits


def test_router_targets_follow_the_cumulative_ensemble() -> None:
    # 3 experts, 3 classes; the comment of each sample gives the argmax of the running means 0, 0..1, 0..2.
    logits = torch.tensor(
        [
            [[2, 0, 0], [0, 5, 0], [0, 0, 0]],  # y=0: right, wrong, wrong -> already right: no escalation
            [[3, 0, 0], [0, 4, 0], [0, 0, 0]],  # y=1: wrong, right, right -> router 0 positive
            [[3, 0, 0], [3, 0, 1], [0, 0, 9]],  # y=2: wrong, wrong, right -> both positive
            [[1, 0, 0], [1, 0, 0], [1, 0, 0]],  # y=2: wrong everywhere -> hopeless, both negative
            [[0, 1, 0], [5, 0, 0], [0, 9, 0]],  # y=1: right, wrong, right -> router 1 positive only
            [[4, 0, 0], [4, 0, 0], [0, 0, 5]],  # y=2: expert 2 alone is right, its cumulative mean is not
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([0, 1, 2, 2, 1, 2])
    expected = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    assert torch.equal(router_targets(logits, labels), expected)


def test_routing_loss_is_weighted_bce_averaged_over_routers() -> None:
    torch.manual_seed(0)
    routers = Routers(num_experts=3, num_classes=4, feature_dim=6, top_z=3, hidden=5)
    logits = torch.randn(8, 3, 4) * 5
    features = torch.rand(8, 3, 6)
    labels = torch.randint(0, 4, (8,))
    loss, targets = routing_loss(routers, logits, features, labels, pos_weight=100.0)
    expected = 0.0
    for k in (1, 2):
        mean = logits[:, :k].sum(dim=1) / k
        x = routers(k, mean, features[:, k - 1])
        t = targets[:, k - 1]
        per_sample = -(100.0 * t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        expected += per_sample.mean() / 2
    torch.testing.assert_close(loss, expected)


def test_cosine_lr_is_stepped_per_epoch_like_the_reference() -> None:
    values = [cosine_lr(0.01, epoch, 5) for epoch in range(1, 6)]
    assert values == pytest.approx([0.01, 0.009045, 0.006545, 0.003455, 0.000955], abs=1e-6)


def test_validation_split_defaults_when_stage1_held_none_out(tiny_checkpoint: Path) -> None:
    meta = load_meta(tiny_checkpoint)
    stage1_without_val = meta.model_copy(
        update={
            "config": meta.config.model_copy(update={"data": meta.config.data.model_copy(update={"val_per_class": 0})})
        }
    )
    assert resolve_route_config(stage1_without_val).data.val_per_class == DEFAULT_VAL_PER_CLASS
    assert resolve_route_config(meta).data.val_per_class == 3
    assert resolve_route_config(meta, overrides=["router.pos_weight=20"]).router.pos_weight == 20
    with pytest.raises(ConfigError, match="model section differs"):
        resolve_route_config(meta, overrides=["model.num_experts=2"])


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 on the tiny real checkpoint


def test_stage2_leaves_every_stage1_tensor_bit_identical(tiny_checkpoint: Path) -> None:
    model, meta, _ = model_from_checkpoint(tiny_checkpoint)
    model.train()  # even a model handed over in train mode must run stage 2 with frozen batch norm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_data(meta.config.data, progress=False)
    subset = ImageSet(data.train.images[:48], data.train.labels[:48])
    torch.manual_seed(0)
    routers = Routers(3, meta.num_classes, model.feature_dim, top_z=10)
    router_before = {k: v.clone() for k, v in routers.state_dict().items()}
    cfg = meta.config.model_copy(update={"router": meta.config.router.model_copy(update={"batch_size": 16})})
    log = train_routers(model, routers, subset, cfg, device=torch.device("cpu"), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(router_before[k], v) for k, v in routers.state_dict().items()), "routers never moved"
    assert log[0]["images"] == 48 and math.isfinite(log[0]["loss"])


def test_routed_checkpoint_holds_stage1_weights_routers_and_meta(
    tiny_checkpoint: Path, tiny_routed_checkpoint: Path
) -> None:
    stage1_meta, stage1 = load_checkpoint(tiny_checkpoint)
    meta, weights = load_checkpoint(tiny_routed_checkpoint)
    assert set(weights) - set(stage1) == {k for k in weights if k.startswith("routers.")}
    assert all(torch.equal(stage1[k], weights[k]) for k in stage1)  # incl. BN running stats
    assert meta.stage == "routers" and meta.complete
    assert meta.parent == weights_sha256(tiny_checkpoint)
    assert meta.routers is not None and meta.routers.top_z == 10 and meta.routers.hidden == 16
    assert meta.routers.threshold == 0.5 and meta.routers.threshold_source == "default"
    assert meta.router_config == stage1_meta.config.router
    assert meta.class_counts == stage1_meta.class_counts and meta.model == stage1_meta.model


def test_routers_from_checkpoint_rebuilds_the_saved_routers(
    tiny_checkpoint: Path, tiny_routed_checkpoint: Path
) -> None:
    model, meta, rest = model_from_checkpoint(tiny_routed_checkpoint)
    routers = routers_from_checkpoint(meta, rest, model.feature_dim)
    assert isinstance(routers, Routers) and not routers.training
    _, weights = load_checkpoint(tiny_routed_checkpoint)
    for key, value in routers.state_dict().items():
        assert torch.equal(value, weights[f"routers.{key}"])
    assert routers.single(1)(torch.ones(2, 10), torch.ones(2, model.feature_dim)).shape == (2, 1)
    plain, plain_meta, plain_rest = model_from_checkpoint(tiny_checkpoint)
    assert routers_from_checkpoint(plain_meta, plain_rest, plain.feature_dim) is None
    with pytest.raises(CheckpointError, match=r"no 'routers\.' keys"):
        routers_from_checkpoint(meta, {}, model.feature_dim)


@pytest.fixture(scope="module")
def routed(tiny_routed_checkpoint: Path, one_thread: None) -> tuple[RIDEModel, Routers, ExpertOutputs, torch.Tensor]:
    """The routed tiny model, its routers, its outputs on the test split and the test images."""
    model, meta, rest = model_from_checkpoint(tiny_routed_checkpoint)
    routers = routers_from_checkpoint(meta, rest, model.feature_dim)
    data = load_data(meta.config.data, progress=False)
    outputs = predict(model, data.test.images, mean=meta.input.mean, std=meta.input.std, device=torch.device("cpu"))
    return model, routers, outputs, normalize(data.test.images, meta.input.mean, meta.input.std)


def replay(routed, outputs: ExpertOutputs | None = None, routers: Routers | None = None) -> ReplayGraphs:
    """The cascade of the routed tiny model (or other ``routers``) replayed on its test outputs (or ``outputs``)."""
    model, own_routers, own_outputs, _ = routed
    routers = own_routers if routers is None else routers
    return ReplayGraphs(own_outputs if outputs is None else outputs, routers, cascade_cost(model, routers, 32))


def test_threshold_zero_is_all_experts_and_one_expert_is_expert_one_bit_for_bit(routed) -> None:
    outputs = routed[2]
    everything = replay(routed).replay(threshold=0.0)
    assert (everything.experts_used == 3).all() and (everything.routers_evaluated == 2).all()
    np.testing.assert_allclose(everything.logits, outputs.mean_logits.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(everything.logits.argmax(axis=1), outputs.mean_logits.argmax(dim=1).numpy())
    np.testing.assert_allclose(everything.relative_compute, 1.0)
    first = replay(routed).replay(threshold=0.0, max_experts=1)
    assert (first.experts_used == 1).all() and np.isnan(first.router_logits).all()
    np.testing.assert_array_equal(first.logits, outputs.logits[:, 0].numpy())


@torch.no_grad()
def early_exit(model: RIDEModel, routers: Routers, images: torch.Tensor, threshold: float):
    """An independent cascade that really runs each expert only on the images still active (as the service does)."""
    shared = model.forward_trunk(images)
    rows = torch.arange(len(images))
    total, feature = model.forward_expert(0, shared)
    final = torch.empty_like(total)
    used = torch.ones(len(images), dtype=torch.long)
    for k in range(1, model.num_experts):
        mean = total / k
        go = torch.from_numpy(continues(routers(k, mean, feature).numpy(), threshold))
        final[rows[~go]] = mean[~go]
        rows, total = rows[go], total[go]
        if len(rows) == 0:
            return final, used
        logits, feature = model.forward_expert(k, shared[rows])
        total = total + logits
        used[rows] += 1
    final[rows] = total / model.num_experts
    return final, used


def _threshold_away_from_every_probability(graphs: ReplayGraphs) -> float:
    """A threshold where router 1 stops between 20 % and 80 % of the images and no router probability is near."""
    probabilities = torch.from_numpy(sigmoid(graphs.replay(threshold=0.0).router_logits))
    values = probabilities.flatten().sort().values
    best, best_gap = None, 0.0
    for low, high in zip(values[:-1].tolist(), values[1:].tolist(), strict=True):
        middle = (low + high) / 2
        stopped = (probabilities[:, 0] < middle).double().mean().item()
        if 0.2 <= stopped <= 0.8 and high - low > best_gap:
            best, best_gap = middle, high - low
    assert best is not None and best_gap > 1e-5, "router probabilities too concentrated for a mixed split"
    return best


def test_cascade_gives_each_image_the_same_answer_alone_as_in_a_batch(routed) -> None:
    model, routers, outputs, images = routed
    images, outputs = images[:16], ExpertOutputs(outputs.logits[:16], outputs.features[:16])
    # The tiny routers' logits are large; centre router 1's on these images so the cascade really splits.
    routers = copy.deepcopy(routers)
    logits = replay(routed, outputs, routers).replay(threshold=0.0).router_logits
    with torch.no_grad():
        routers.fc.bias -= torch.from_numpy(logits[:, 0]).median()
    graphs = replay(routed, outputs, routers)
    threshold = _threshold_away_from_every_probability(graphs)
    replayed = graphs.replay(threshold=threshold)
    replay_used, replay_logits = torch.from_numpy(replayed.experts_used), torch.from_numpy(replayed.logits)
    assert 0 < (replay_used == 1).sum() < len(replay_used), "the threshold should stop some images early"
    batch, batch_used = early_exit(model, routers, images, threshold)
    assert torch.equal(batch_used, replay_used)
    assert torch.equal(batch.argmax(dim=1), replay_logits.argmax(dim=1))
    torch.testing.assert_close(batch, replay_logits, rtol=0, atol=1e-4)
    for i in range(len(images)):
        alone, alone_used = early_exit(model, routers, images[i : i + 1], threshold)
        assert alone_used.item() == batch_used[i].item()
        assert alone.argmax(dim=1).item() == batch[i].argmax().item()
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Routed evaluation and the curve


def test_evaluate_reports_routed_metrics_and_the_compute_actually_spent(
    tiny_routed_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(tiny_routed_checkpoint, tmp_path / "routed"))
    assert main(["evaluate", "--checkpoint", str(folder), "--device", "cpu"]) == 0
    assert "routed" in capsys.readouterr().out
    metrics = json.loads((folder / METRICS_FILE).read_text())
    written_by_route = load_meta(tiny_routed_checkpoint).metrics
    routed, cost = metrics["routed"], metrics["cost"]["macs_per_image"]
    assert routed["threshold"] == load_meta(folder).routers.threshold
    assert routed["top1"] == written_by_route.routed.top1
    assert metrics["all_experts"]["top1"] == written_by_route.all_experts.top1
    counts = routed["experts_used_counts"]
    assert sum(counts["overall"]) == metrics["num_images"] == 100
    assert [sum(c) for c in zip(counts["many"], counts["medium"], counts["few"], strict=True)] == counts["overall"]
    assert sum(routed["experts_used_histogram"]["overall"]) == pytest.approx(1.0)
    # Images that stopped after k < 3 experts ran k routers; those that ran all 3 ran both routers.
    experts, routers = cost["experts"], cost["routers"]
    spent_by_k = [
        cost["trunk"] + experts[0] + routers[0],
        cost["trunk"] + experts[0] + experts[1] + routers[0] + routers[1],
        cost["trunk"] + sum(experts) + sum(routers),
    ]
    mean = sum(n * c for n, c in zip(counts["overall"], spent_by_k, strict=True)) / 100
    assert routed["mean_macs_per_image"] == pytest.approx(mean, rel=1e-12)
    assert routed["relative_compute"] == pytest.approx(mean / spent_by_k[2], rel=1e-12)
    assert routed["mean_experts_used"] == pytest.approx(sum((k + 1) * n for k, n in enumerate(counts["overall"])) / 100)
    assert 0 < routers[0] < experts[0] / 1000
    assert set(routed["groups"]) == {"many", "medium", "few"}
    assert metrics["threshold_selection"]["source"] == "default"


def test_curve_files_and_the_threshold_chosen_on_validation(tiny_routed_checkpoint: Path) -> None:
    points = read_curve_csv(tiny_routed_checkpoint / CURVE_CSV)
    assert (tiny_routed_checkpoint / CURVE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.split for p in points} == {"val", "test"}
    assert {p.max_experts for p in points if p.split == "val"} == {1, 2, 3}
    val = [p for p in points if p.split == "val"]
    all_experts = next(p for p in val if p.max_experts == 3 and p.threshold == 0.0)
    single = next(p for p in val if p.max_experts == 1)
    assert all_experts.relative_compute == pytest.approx(1.0) and all_experts.mean_experts_used == 3
    assert single.mean_experts_used == 1 and 0.45 < single.relative_compute < 0.55
    assert all(p.relative_compute <= 1.0 + 1e-12 for p in points)
    metrics = load_meta(tiny_routed_checkpoint).metrics
    test_all = next(p for p in points if p.split == "test" and p.max_experts == 3 and p.threshold == 0.0)
    assert test_all.top1 == pytest.approx(metrics.all_experts.top1)


def test_route_cli_picks_the_target_compute_threshold_on_validation(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "routed"
    args = ["route", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--target-compute", "1.0", "--set", "router.pos_weight=20"]) == 0
    meta = load_meta(out)
    val = [p for p in read_curve_csv(out / CURVE_CSV) if p.split == "val"]
    assert meta.routers.threshold == choose_threshold(val, 1.0, 3).threshold
    assert meta.routers.threshold_source == "target-compute 1.0 on validation split (3 per class)"
    assert meta.router_config.pos_weight == 20
    assert meta.metrics.routed.threshold == meta.routers.threshold
    assert meta.metrics.validation.held_out_from_stage1 is True
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and log[0]["lr"] == 0.01


def _point(split: str, threshold: float, top1: float, compute: float) -> CurvePoint:
    return CurvePoint(split, 3, threshold, "grid", top1, None, None, None, 2.0, 1.0, compute)


def test_choose_threshold_uses_validation_only_and_respects_the_budget() -> None:
    points = [
        _point("val", 0.2, 0.70, 0.90),
        _point("val", 0.5, 0.65, 0.70),
        _point("val", 0.6, 0.65, 0.60),  # same accuracy, cheaper: preferred
        _point("val", 0.9, 0.50, 0.55),
        _point("test", 0.7, 0.99, 0.50),  # better on test, never considered
    ]
    assert choose_threshold(points, 0.75, 3).threshold == 0.6
    assert choose_threshold(points, 1.0, 3).threshold == 0.2
    with pytest.raises(ConfigError, match=r"cheapest routed setting on the validation split costs 0\.550"):
        choose_threshold(points, 0.52, 3)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        choose_threshold(points, 1.5, 3)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _one_expert_checkpoint(tiny_checkpoint: Path, folder: Path) -> Path:
    meta = load_meta(tiny_checkpoint)
    model_cfg = ModelConfig(arch="resnet32", num_experts=1)
    model = build_model(model_cfg, meta.num_classes)
    one = meta.model_copy(update={"model": model_cfg, "config": meta.config.model_copy(update={"model": model_cfg})})
    save_checkpoint(folder, model.state_dict(), one)
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["--threshold", "-0.1"], "--threshold must be in [0, 1]"),
        (["--target-compute", "0"], "--target-compute must be in (0, 1]"),
        (["--target-compute", "0.3"], "stopping every image after the first expert already costs 0.49"),
        (["--set", "model.num_experts=2"], "model section differs"),
        (["--set", "router.threshold=2"], "router.threshold"),
    ],
)
def test_route_rejects_bad_arguments(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["route", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_route_rejects_one_expert_routed_and_unfinished_checkpoints(
    tiny_checkpoint: Path, tiny_routed_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _one_expert_checkpoint(tiny_checkpoint, tmp_path / "one")
    assert main(["route", "--checkpoint", str(one), "--out", str(tmp_path / "a")]) == 2
    assert "has one expert" in capsys.readouterr().err
    assert main(["route", "--checkpoint", str(tiny_routed_checkpoint), "--out", str(tmp_path / "b")]) == 2
    assert "already has routers" in capsys.readouterr().err
    unfinished = Path(shutil.copytree(tiny_checkpoint, tmp_path / "unfinished"))
    save_meta(unfinished, load_meta(unfinished).model_copy(update={"complete": False}))
    with pytest.raises(ConfigError, match="unfinished run"):
        route_checkpoint(unfinished, out=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="either --threshold or --target-compute"):
        route_checkpoint(tiny_checkpoint, out=tmp_path / "d", threshold=0.5, target_compute=0.5, progress=False)
    with pytest.raises(ConfigError, match="never overwrites"):
        route_checkpoint(tiny_checkpoint, out=tiny_checkpoint, progress=False)
